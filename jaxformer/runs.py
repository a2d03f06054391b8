"""The one reader of run directories, for the entry points, the studies' analysis scripts,
`experiments/*/run.py` and the tests.

A run dir, as `python -m jaxformer.train` leaves it:
  .hydra/config.yaml   the composed training config (Hydra)
  metrics.jsonl        one JSON record a line: {"step", "split": train | eval | diagnostics |
                       summary | test_time, **metrics}
  finished.json        written last, when the run reached trainer.steps: step, eval metrics, samples
  .lock                flock-ed by the process training in it (training/run_dir.py:RunLock)
  checkpoints/STEP/    orbax items `state` (the TrainState), `data` (the data position), `meta`
                       (the resolved model config, parameter count, objective, optimizer settings)
  tokenizer.json       the task's tokenizer (token tasks)
  wandb_run_id         the wandb run a resumed job continues

A run's state (`RunDir.state`): finished (its marker is there), diverged (it stopped at a
non-finite training step), running (a process on this machine holds its lock), not started (no
metric record yet) or interrupted (anything else: killed, preempted, out of time, or running on
another host).

Every problem (missing run dir, no checkpoints, unknown step, unreadable config or checkpoint)
is a `UserError` naming the path and the fix; `key` names the setting that pointed here.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from flax import nnx, traverse_util
from omegaconf import OmegaConf
from tokenizers import Tokenizer

from jaxformer.config import (
    ModelConfig, TrainConfig, TrainerConfig, lower_is_better, to_dict, to_train_config,
)
from jaxformer.data.tasks import Task, build_task
from jaxformer.data.tokenizers import load_tokenizer
from jaxformer.data.vectors import TeacherTask
from jaxformer.errors import UserError
from jaxformer.models import build_model, count_params, split_model
from jaxformer.objectives import Objective, objective_for
from jaxformer.tracking import WANDB_ID_FILE

HYDRA_CONFIG = Path(".hydra") / "config.yaml"
METRICS = "metrics.jsonl"
FINISHED = "finished.json"
CHECKPOINTS = "checkpoints"
TOKENIZER = "tokenizer.json"
LOCK = ".lock"
# the items of every checkpoint (jaxformer/training/checkpoint.py writes them)
STATE_ITEM, DATA_ITEM, META_ITEM = "state", "data", "meta"


# what RunDir.state says
FINISHED_STATE, DIVERGED, RUNNING, INTERRUPTED, NOT_STARTED = (
    "finished", "diverged", "running", "interrupted", "not started")


def stops_training(record: dict, trainer: TrainerConfig) -> bool:
    """Whether a train record is a non-finite step that ends the run (training/train_log.py's
    check_finite raises on it): any under trainer.nonfinite=stop, the one past
    trainer.max_skipped_steps under skip."""
    if not record.get("nonfinite"):
        return False
    return trainer.nonfinite != "skip" or record["skipped_steps"] > trainer.max_skipped_steps


# train-record fields measured in wall time (training/train_log.py): they differ between two runs
# of the same bits, and a summary leaves them out
TIMING_KEYS = ("tokens_per_s", "step_time_s", "mfu")


def metrics_summary(records: list[dict]) -> dict[str, float]:
    """A run's summary from its records: each train and eval metric's last value (`train/NAME`,
    `eval/NAME`), and each eval metric's best (`best/eval/NAME`, lower or higher as its name
    says: config.lower_is_better) with the step it was reached at (`best_step/eval/NAME`)."""
    summary: dict[str, float] = {}
    for record in records:
        split = record.get("split")
        if split not in ("train", "eval"):
            continue
        for name, value in record.items():
            if name in ("step", "split", *TIMING_KEYS) or not isinstance(value, (int, float)) \
                    or isinstance(value, bool):
                continue
            summary[f"{split}/{name}"] = value
            if split != "eval" or not math.isfinite(value):
                continue
            best = summary.get(f"best/eval/{name}")
            if best is None or (value < best if lower_is_better(name) else value > best):
                summary[f"best/eval/{name}"], summary[f"best_step/eval/{name}"] = \
                    value, record["step"]
    return summary


class RestoredRun(NamedTuple):
    model: nnx.Module
    model_cfg: ModelConfig
    tokenizer: Tokenizer | None
    step: int
    objective: str | None = None  # the objective it trained with (its checkpoint records it)


@dataclass(frozen=True)
class RunDir:
    """A run directory, read lazily; `RunDir.open` checks that it is one."""

    path: Path  # a str is taken too
    key: str = "checkpoint"  # the setting that named it, for error messages

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))  # frozen: set once, here

    @classmethod
    def open(cls, path: Path | str, key: str = "checkpoint", *, checkpoints: bool = True) -> RunDir:
        """The run dir at `path`; refuses a path that is none (or, with `checkpoints`, one with
        no checkpoints/ folder)."""
        run = cls(Path(path), key)
        if not run.path.is_dir():
            raise UserError(f"{key}={path} does not exist: point it at a run dir written by "
                            "jaxformer.train")
        if checkpoints and not run.checkpoints_dir.is_dir():
            raise UserError(f"{key}={path} has no checkpoints/ folder: point it at a run dir "
                            "written by jaxformer.train")
        return run

    # -- files ------------------------------------------------------------------------------------
    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @cached_property
    def config(self) -> TrainConfig:
        """The training config the run was launched with (checked against today's schema)."""
        path = self.path / HYDRA_CONFIG
        if not path.is_file():
            raise UserError(f"{self.key}={self.path} has no {HYDRA_CONFIG}: point it at a run dir "
                            "written by python -m jaxformer.train")
        try:
            return to_train_config(OmegaConf.merge(OmegaConf.structured(TrainConfig),
                                                   OmegaConf.load(path)))
        except UserError as err:
            raise UserError(f"the config of {path} is not valid today: {err}") from err
        except Exception as err:  # noqa: BLE001 (YAML or OmegaConf errors, any kind)
            raise UserError(f"cannot read {path}: {str(err).splitlines()[0]}") from err

    def metrics(self, split: str | None = None) -> list[dict]:
        """The records of metrics.jsonl (of one split), in order; [] before the first one."""
        if not self.metrics_path.exists():
            return []
        records = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a killed run (or a blank one)
        return [r for r in records if split is None or r.get("split") == split]

    @property
    def finished(self) -> dict | None:
        """The finished marker (step, eval metrics, samples); None while the run is unfinished
        (or its marker is torn: then it resumes from its checkpoint)."""
        path = self.path / FINISHED
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None

    @cached_property
    def flat_config(self) -> dict[str, Any]:
        """The config as dotted keys (`model.d_model`): what runs of a sweep differ in."""
        return traverse_util.flatten_dict(to_dict(self.config), sep=".")

    def state(self, records: list[dict] | None = None) -> str:
        """finished, diverged, running, interrupted or not started (the module's docstring);
        `records`: its metrics() when already read."""
        records = self.metrics() if records is None else records
        train = [r for r in records if r.get("split") == "train"]
        try:
            trainer = self.config.trainer
        except UserError:  # an unreadable config: what the files say without it
            trainer = None
        finished = self.finished
        if finished is not None and (trainer is None or finished.get("step", 0) >= trainer.steps):
            return FINISHED_STATE
        if train and train[-1].get("nonfinite") and (trainer is None
                                                     or stops_training(train[-1], trainer)):
            return DIVERGED
        if self.lock_held():
            return RUNNING
        return INTERRUPTED if records else NOT_STARTED

    def lock_held(self) -> bool:
        """Whether a process on this machine holds the run's lock (training/run_dir.py:RunLock),
        as Linux's /proc/locks lists it: read-only, so it never races a run that is starting.
        False elsewhere, and for a run on another host."""
        try:
            stat = (self.path / LOCK).stat()
            locks = Path("/proc/locks").read_text()
        except OSError:
            return False
        file = (os.major(stat.st_dev), os.minor(stat.st_dev), stat.st_ino)
        for line in locks.splitlines():  # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2165555 0 EOF"
            fields = line.split()
            if "FLOCK" in fields and "->" not in fields:  # "->": a waiter, not the holder
                parts = next((f.split(":") for f in fields if f.count(":") == 2), None)
                try:
                    if parts and (int(parts[0], 16), int(parts[1], 16), int(parts[2])) == file:
                        return True
                except ValueError:
                    continue
        return False

    @cached_property
    def tokens_per_step(self) -> int | None:
        """Token positions one training step reads: batch size x the objective's widest array
        (what tokens_per_s counts). None when the task cannot be built here (say, a text corpus
        that is not on this machine) or the config is unreadable."""
        try:
            return self.config.trainer.batch_size * self.objective.max_positions(self.task)
        except (UserError, OSError):
            return None

    def wall_time(self, records: list[dict] | None = None) -> float | None:
        """Seconds the run trained: the sum of the intervals between its train records (each
        record's tokens_per_s is tokens_per_step x steps / interval, so the interval comes back
        exactly; the time between a kill and its resume is not counted). Without
        tokens_per_step: the run's files, .hydra/config.yaml (rewritten at every launch) to the
        last metrics line. None before the first record."""
        records = self.metrics("train") if records is None else \
            [r for r in records if r.get("split") == "train"]
        if not records:
            return None
        if self.tokens_per_step is not None and all(r.get("tokens_per_s") for r in records):
            steps = [0] + [r["step"] for r in records]
            return sum(self.tokens_per_step * (steps[i + 1] - steps[i]) / r["tokens_per_s"]
                       for i, r in enumerate(records))
        config = self.path / HYDRA_CONFIG
        if not config.is_file():
            return None
        return max(self.metrics_path.stat().st_mtime - config.stat().st_mtime, 0.0)

    @property
    def wandb_id(self) -> str | None:
        path = self.path / WANDB_ID_FILE
        return path.read_text().strip() if path.exists() else None

    @cached_property
    def tokenizer(self) -> Tokenizer | None:
        """The run's tokenizer; None for vector tasks, which have none."""
        path = self.path / TOKENIZER
        if not path.exists() and self.checkpoint_meta().get("model", {}).get("vocab_size") is None:
            return None
        try:
            return load_tokenizer(path)
        except (FileNotFoundError, ValueError) as err:  # missing or malformed tokenizer.json
            raise UserError(str(err)) from err

    # -- checkpoints ------------------------------------------------------------------------------
    def _manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(self.checkpoints_dir.absolute(),
                                     options=ocp.CheckpointManagerOptions(read_only=True))

    def checkpoint_steps(self) -> list[int]:
        if not self.checkpoints_dir.is_dir():
            return []
        manager = self._manager()
        try:
            return sorted(manager.all_steps())
        finally:
            manager.close()

    def resolve_step(self, step: int | None) -> int:
        """`step` if the run has it; None: the latest."""
        steps = self.checkpoint_steps()
        if not steps:
            raise UserError(f"{self.checkpoints_dir} holds no checkpoints: train the run first")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise UserError(f"step={step} is not in {self.checkpoints_dir} (available: "
                            f"{', '.join(map(str, steps))}): pick one of those")
        return step

    def checkpoint_meta(self, step: int | None = None) -> dict:
        """What a checkpoint records beside the state: model config, n_params, objective, ..."""
        return self._meta_at(self.resolve_step(step))

    def _meta_at(self, step: int) -> dict:
        manager = self._manager()
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                **{META_ITEM: ocp.args.JsonRestore()}))
            return restored[META_ITEM]
        except Exception as err:  # noqa: BLE001 (orbax raises many kinds on unreadable files)
            raise UserError(f"cannot read the metadata of {self.checkpoints_dir / str(step)}: "
                            f"{str(err).splitlines()[0]}") from err
        finally:
            manager.close()

    def model_config(self, step: int | None = None, meta: dict | None = None) -> ModelConfig:
        """The resolved model config (vocabulary and classes filled in) a checkpoint was made by."""
        meta = self.checkpoint_meta(step) if meta is None else meta
        try:
            return ModelConfig(**meta["model"])
        except Exception as err:  # noqa: BLE001 (a model config this version does not know)
            raise UserError(f"cannot read the model config of "
                            f"{self.checkpoints_dir / str(self.resolve_step(step))}: "
                            f"{str(err).splitlines()[0]}") from err

    @cached_property
    def task(self) -> Task | TeacherTask:
        return build_task(self.config.task)

    @cached_property
    def objective(self) -> Objective:
        return objective_for(self.config.model, self.task)

    @cached_property
    def n_params(self) -> int:
        """Parameters of the run's model: what its checkpoints record or, before the first
        checkpoint, counted from the model its config resolves to (no array is built)."""
        if self.checkpoint_steps():
            return int(self.checkpoint_meta()["n_params"])
        model_cfg = self.objective.model_config(self.config.model, self.task)
        return count_params(split_model(nnx.eval_shape(lambda: build_model(model_cfg, 0)))[1])

    def restore(self, step: int | None = None) -> RestoredRun:
        """The model, model config and tokenizer at `step` (None: the latest checkpoint).

        Only the parameters are read (a partial restore of the `state` item), so this needs
        neither the optimizer config nor the memory for its state."""
        step = self.resolve_step(step)
        meta = self._meta_at(step)
        model_cfg = self.model_config(step, meta)
        graphdef, abstract_params, rest = split_model(
            nnx.eval_shape(lambda: build_model(model_cfg, 0)))
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = {"params": jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
            abstract_params)}
        manager = self._manager()
        try:  # the optimizer state and the rest of the TrainState stay on disk
            restored = manager.restore(step, args=ocp.args.Composite(**{
                STATE_ITEM: ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True)}))
        except Exception as err:  # noqa: BLE001 (orbax raises many kinds on corrupt trees)
            raise UserError(f"cannot restore the parameters of {self.checkpoints_dir / str(step)}: "
                            f"{str(err).splitlines()[0]}") from err
        finally:
            manager.close()
        model = nnx.merge(graphdef, restored[STATE_ITEM]["params"], rest)
        return RestoredRun(model, model_cfg, self.tokenizer, step, meta.get("objective"))


def restore_run(path: Path | str, step: int | None = None, key: str = "checkpoint") -> RestoredRun:
    """`RunDir.open(path, key).restore(step)`: a trained run's model, config and tokenizer."""
    return RunDir.open(path, key).restore(step)


def find_runs(root: Path | str) -> list[RunDir]:
    """Every run dir under `root` (a run dir itself, or a sweep dir at any depth), sorted by
    path: the directories holding a .hydra/config.yaml."""
    root = Path(root)
    return [RunDir(path.parent.parent)
            for path in sorted(root.glob(f"**/{HYDRA_CONFIG.as_posix()}"))]
