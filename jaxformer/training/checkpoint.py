"""orbax checkpoints of the train state, the data position and the model config.

orbax writes each step to a temporary folder and renames it when complete, so a crash mid-save
never leaves a half checkpoint as "latest". Restores target the abstract state, so arrays come back
with the right shapes and dtypes, and a checkpoint from a different model is refused up front.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from jaxformer.config import ConfigError
from jaxformer.training.state import TrainState


class Checkpointer:
    def __init__(self, directory: Path, keep: int, save_every: int):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=save_every, create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self.manager.should_save(step)

    def save(self, step: int, state: TrainState, data_state: dict, meta: dict, force=False) -> bool:
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )

    def read_meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored.meta

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict]:
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                ),
            )
        except Exception as err:  # orbax raises many kinds on corrupt or mismatched trees
            raise ConfigError(
                f"cannot restore checkpoint {self.directory / str(step)}: "
                f"{str(err).splitlines()[0]} (delete it or start a new hydra.run.dir)"
            ) from None
        return restored.state, restored.data

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


# Switches that change how a model runs, not its parameters: free to differ on resume.
RUNTIME_ONLY = ("dropout", "scan_layers", "attention", "dtype")


def check_compatible(saved_model: dict[str, Any], model: dict[str, Any], where: Path) -> None:
    """Refuse to resume a checkpoint written by a model of another shape."""
    changed = [
        f"model.{key}={saved_model.get(key)!r} there, {value!r} now"
        for key, value in model.items()
        if key not in RUNTIME_ONLY and saved_model.get(key) != value
    ]
    if changed:
        raise ConfigError(
            f"checkpoint in {where} was written by another model ({'; '.join(changed)}): "
            "use the same model config or a new hydra.run.dir"
        )
