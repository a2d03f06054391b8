"""The one reader of run directories, for the entry points, the studies' analysis scripts,
`experiments/*/run.py` and the tests.

A run dir, as `python -m jaxformer.train` leaves it:
  .hydra/config.yaml   the composed training config (Hydra)
  metrics.jsonl        one JSON record a line: {"step", "split": train | eval | diagnostics |
                       summary | test_time, **metrics}
  finished.json        written last, when the run reached trainer.steps: step, eval metrics, samples
  checkpoints/STEP/    orbax items `state` (the TrainState), `data` (the data position), `meta`
                       (the resolved model config, parameter count, objective, optimizer settings)
  tokenizer.json       the task's tokenizer (token tasks)
  wandb_run_id         the wandb run a resumed job continues

Every problem (missing run dir, no checkpoints, unknown step, unreadable config or checkpoint)
is a `UserError` naming the path and the fix; `key` names the setting that pointed here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import jax
import orbax.checkpoint as ocp
from flax import nnx
from omegaconf import OmegaConf
from tokenizers import Tokenizer

from jaxformer.config import ModelConfig, TrainConfig, to_train_config
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
# the items of every checkpoint (jaxformer/training/checkpoint.py writes them)
STATE_ITEM, DATA_ITEM, META_ITEM = "state", "data", "meta"


class RestoredRun(NamedTuple):
    model: nnx.Module
    model_cfg: ModelConfig
    tokenizer: Tokenizer | None
    step: int
    objective: str | None = None  # the objective it trained with (its checkpoint records it)


@dataclass(frozen=True)
class RunDir:
    """A run directory, read lazily; `RunDir.open` checks that it is one."""

    path: Path
    key: str = "checkpoint"  # the setting that named it, for error messages

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
