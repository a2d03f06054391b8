"""orbax checkpoints of the train state, the data position and the model config.

Atomic: orbax writes each step into a temporary folder and renames it when complete, so a crash
mid-save (SIGKILL included) never leaves a half checkpoint as "latest"; the next start ignores
the leftover. Robust: a latest checkpoint that fails to restore (corrupt, truncated) is skipped
with a warning and the one before it is used. Kept: the latest `keep` plus, when asked, the best
`keep_best` by an eval metric. Restores target the abstract (sharded) state, so arrays come back
with the right shapes, dtypes and placement, and a checkpoint from another model is refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from jaxformer.config import RUNTIME, ModelConfig
from jaxformer.errors import UserError
from jaxformer.runs import DATA_ITEM, META_ITEM, STATE_ITEM
from jaxformer.training.state import TrainState

log = logging.getLogger(__name__)


def warn(message: str) -> None:
    """On the console and in train.log under Hydra; on stderr (logging's last resort) elsewhere."""
    log.warning(message)


class Checkpointer:
    def __init__(self, directory: Path, keep: int, save_every: int, *, keep_best: int = 0,
                 best_metric: str = "loss", best_mode: str = "min"):
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        preserve = [policies.LatestN(n=keep)]
        if keep_best:
            preserve.append(policies.BestN(
                get_metric_fn=lambda metrics: metrics[best_metric], reverse=best_mode == "min",
                n=keep_best, keep_checkpoints_without_metrics=False,
            ))
        options = ocp.CheckpointManagerOptions(
            create=True, preservation_policy=policies.AnyPreservationPolicy(preserve),
            # every save_every steps, nothing more: no step-1 save, and preemption is the loop's
            save_decision_policy=policies.FixedIntervalPolicy(save_every),
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self.manager.should_save(step)

    def save(self, step: int, state: TrainState, data_state: dict, meta: dict,
             eval_metrics: dict[str, float] | None = None, force: bool = False) -> bool:
        """Write step `step`; `eval_metrics` (with the best metric) make it a best-K candidate."""
        metrics = None
        if eval_metrics and self.best_metric in eval_metrics:
            metrics = {self.best_metric: float(eval_metrics[self.best_metric])}
        return self.manager.save(
            step,
            args=ocp.args.Composite(**{
                STATE_ITEM: ocp.args.StandardSave(state),
                DATA_ITEM: ocp.args.JsonSave(data_state),
                META_ITEM: ocp.args.JsonSave(meta),
            }),
            metrics=metrics, force=force,
        )

    def read_meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            **{META_ITEM: ocp.args.JsonRestore()}))
        return restored[META_ITEM]

    def saved_state_paths(self, step: int) -> set[str]:
        """The array paths of step `step`'s train state, from the checkpoint's own (orbax) tree
        metadata: what it holds, read without restoring anything."""
        reader = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(read_only=True),
            item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler()})
        try:
            tree = reader.item_metadata(step)[STATE_ITEM]
            return array_paths(getattr(tree, "tree", tree))
        finally:
            reader.close()

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict]:
        """(state, data position) of step `step`. A checkpoint whose train state has other arrays
        than `abstract_state` (another optimizer or freezing layout) is a StateMismatch; one that
        cannot be read or restored is a UserError (corrupt: the caller may fall back)."""
        where = self.directory / str(step)
        try:
            saved = self.saved_state_paths(step)
        except Exception as err:  # noqa: BLE001 (orbax raises many kinds on corrupt files)
            raise UserError(f"checkpoint {where} does not restore (unreadable metadata: "
                            f"{str(err).strip().splitlines()[0]})") from err
        wanted = state_paths(abstract_state)
        if saved != wanted:
            raise StateMismatch(f"checkpoint {where} holds a train state of another layout "
                                f"({len(saved - wanted)} arrays only there, {len(wanted - saved)} "
                                "only here)", where)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**{
                STATE_ITEM: ocp.args.StandardRestore(abstract_state),
                DATA_ITEM: ocp.args.JsonRestore()}))
        except Exception as err:  # noqa: BLE001 (orbax raises many kinds on corrupt trees)
            raise UserError(f"checkpoint {where} does not restore "
                            f"({str(err).strip().splitlines()[0]})") from err
        return restored[STATE_ITEM], restored[DATA_ITEM]

    def latest_meta(self) -> tuple[int, dict] | None:
        """(step, meta) of the newest checkpoint whose meta reads; None without checkpoints."""
        for step in reversed(self.steps()):
            try:
                return step, self.read_meta(step)
            except Exception as err:  # noqa: BLE001 (any unreadable checkpoint is skipped)
                warn(f"checkpoint {self.directory / str(step)} is unreadable "
                     f"({str(err).splitlines()[0]}); trying the one before it")
        return None

    def restore_latest(self, abstract_state: TrainState) -> tuple[TrainState, dict, int] | None:
        """(state, data position, step) from the newest checkpoint that restores, falling back
        past corrupt ones with a warning; None when there are no checkpoints at all."""
        steps = self.steps()
        failures = []
        for step in reversed(steps):
            try:
                state, data_state = self.restore(step, abstract_state)
            except StateMismatch:
                raise  # not corrupt: falling back would meet the same layout
            except UserError as err:
                failures.append(str(err))
                warn(f"{err}: falling back to the checkpoint before it")
                continue
            for bad in steps[len(steps) - len(failures):]:
                self.quarantine(bad)
            return state, data_state, step
        if failures:
            raise UserError(f"none of the {len(steps)} checkpoints in {self.directory} restores "
                            f"(newest: {failures[0]}): start a new hydra.run.dir")
        return None

    def quarantine(self, step: int) -> None:
        """Move an unrestorable checkpoint aside (kept for a post-mortem, never deleted), so the
        resumed run can write that step again."""
        target = self.directory.parent / "checkpoints_unrestorable" / str(step)
        target.parent.mkdir(parents=True, exist_ok=True)
        (self.directory / str(step)).rename(target)
        warn(f"moved the unrestorable checkpoint {self.directory / str(step)} to {target}")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()




def array_paths(tree: Any) -> set[str]:
    """The paths of a (serialised) tree's arrays, in orbax's flat names (`opt_state.1.0.mu...`);
    empty nodes (optax's EmptyState, a frozen group's MaskedNode) hold no array and no path."""
    flat = ocp.tree.to_flat_dict(tree, sep=".")
    return {path for path, leaf in flat.items() if hasattr(leaf, "shape")}


def state_paths(abstract_state: TrainState) -> set[str]:
    """The array paths a train state saves as."""
    return array_paths(ocp.tree.serialize_tree(abstract_state, keep_empty_nodes=True))


class StateMismatch(UserError):
    """A checkpoint that reads but holds a train state of another structure (optimizer state of
    another optimizer or freezing layout)."""

    def __init__(self, message: str, checkpoint: Path):
        super().__init__(message)
        self.checkpoint = checkpoint


def changed_settings(section: str, saved: dict[str, Any], now: dict[str, Any],
                     ignore: tuple[str, ...] = ()) -> list[str]:
    """`section.key=<saved> there, <now> now` for every key whose value differs."""
    return [f"{section}.{key}={saved.get(key)!r} there, {value!r} now"
            for key, value in now.items() if key not in ignore and saved.get(key) != value]


def check_compatible(saved_model: dict[str, Any], model: dict[str, Any], where: Path) -> None:
    """Refuse to resume a checkpoint written by a model of another shape."""
    changed = changed_settings("model", saved_model, model, ModelConfig.fields_with_role(RUNTIME))
    if changed:
        raise UserError(
            f"checkpoint in {where} was written by another model ({'; '.join(changed)}): "
            "use the same model config or a new hydra.run.dir"
        )


def explain_state_mismatch(err: StateMismatch, saved_meta: dict[str, Any],
                           sections: dict[str, dict[str, Any]]) -> str:
    """One line for a checkpoint whose train state has another structure than this run's: the
    optim / finetune settings that differ from those that wrote it (recorded in its meta)."""
    changed = [line for name, now in sections.items() if name in saved_meta
               for line in changed_settings(name, saved_meta[name], now)]
    differs = "; ".join(changed) if changed else (
        "its optimizer state has another layout than this config builds")
    return (f"checkpoint {err.checkpoint} does not restore into this run's train state: "
            f"{differs}. Resume with the settings that wrote it, or use a new hydra.run.dir")
