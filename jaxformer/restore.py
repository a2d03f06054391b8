"""Restoring a trained run for inference: its parameters (any model family), model config,
tokenizer and training config, and encoding user text the way training framed it.

Every problem (missing run dir, no checkpoints, unknown step, corrupt checkpoint, text the
tokenizer cannot encode) is a `ConfigError` with one line naming the key and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import jax
import orbax.checkpoint as ocp
from flax import nnx
from omegaconf import OmegaConf
from tokenizers import Tokenizer

from jaxformer.config import ConfigError, ModelConfig, TrainConfig, to_train_config
from jaxformer.data.tokenizers import BOS_ID, EOS_ID, NUM_SPECIAL, UNK_ID, load_tokenizer
from jaxformer.models import build_model
from jaxformer.training.state import split_model


# -- restoring a run ------------------------------------------------------------------------------
def checkpoints_dir(run_dir: Path) -> Path:
    directory = run_dir / "checkpoints"
    if not run_dir.is_dir():
        raise ConfigError(f"checkpoint={run_dir} does not exist: point it at a run dir written by "
                          "jaxformer.train")
    if not directory.is_dir():
        raise ConfigError(f"checkpoint={run_dir} has no checkpoints/ folder: point it at a run dir "
                          "written by jaxformer.train")
    return directory


class RestoredRun(NamedTuple):
    model: nnx.Module
    model_cfg: ModelConfig
    tokenizer: Tokenizer
    step: int


def restore_params(run_dir: Path | str, step: int | None = None) -> RestoredRun:
    """The model, model config and tokenizer of a run dir at `step` (None: the latest checkpoint).

    Only the parameters are read (partial restore of the `state` item), so this needs neither the
    optimizer config nor the memory for its state.
    """
    run_dir = Path(run_dir)
    directory = checkpoints_dir(run_dir)
    manager = ocp.CheckpointManager(
        directory.absolute(), options=ocp.CheckpointManagerOptions(read_only=True)
    )
    try:
        step = resolve_step(manager, directory, step)
        model_cfg = read_model_config(manager, directory, step)
        graphdef, abstract_params, rest = split_model(
            nnx.eval_shape(lambda: build_model(model_cfg, 0))
        )
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = {"params": jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
            abstract_params,
        )}
        try:  # partial restore: the optimizer state and the rest of the TrainState stay on disk
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True,
            )))
        except Exception as err:  # orbax raises many kinds on corrupt or mismatched trees
            raise ConfigError(f"cannot restore the parameters of {directory / str(step)}: "
                              f"{str(err).splitlines()[0]}") from None
    finally:
        manager.close()
    try:
        tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    except (FileNotFoundError, ValueError) as err:  # missing or malformed tokenizer.json
        raise ConfigError(str(err)) from None
    model = nnx.merge(graphdef, restored.state["params"], rest)
    return RestoredRun(model, model_cfg, tokenizer, step)


def resolve_step(manager: ocp.CheckpointManager, directory: Path, step: int | None) -> int:
    steps = manager.all_steps()
    if not steps:
        raise ConfigError(f"{directory} holds no checkpoints: train the run first")
    if step is None:
        return manager.latest_step()
    if step not in steps:
        raise ConfigError(f"step={step} is not in {directory} (available: "
                          f"{', '.join(map(str, sorted(steps)))}): pick one of those")
    return step


def read_model_config(manager: ocp.CheckpointManager, directory: Path, step: int) -> ModelConfig:
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        return ModelConfig(**meta["model"])
    except Exception as err:  # unreadable meta, or a model config this version does not know
        raise ConfigError(f"cannot read the model config of {directory / str(step)}: "
                          f"{str(err).splitlines()[0]}") from None


def encode_text(tokenizer: Tokenizer, text: str, key: str, *, bos: bool, eos: bool,
                max_len: int) -> list[int]:
    """Token ids of `text` framed as in training; `key` names the config field in errors."""
    encoding = tokenizer.encode(text)
    unknown = sorted({text[start:end] for (start, end), token_id in
                      zip(encoding.offsets, encoding.ids) if token_id == UNK_ID})
    if unknown:
        alphabet = "".join(token for token, token_id in sorted(
            tokenizer.get_vocab().items(), key=lambda item: item[1]) if token_id >= NUM_SPECIAL)
        raise ConfigError(f"{key}={text!r} has characters outside the tokenizer's vocabulary "
                          f"({', '.join(map(repr, unknown))}): use only {alphabet!r}")
    ids = [BOS_ID] * bos + encoding.ids + [EOS_ID] * eos
    if len(ids) > max_len:
        raise ConfigError(f"{key} is {len(ids)} tokens long with its special tokens but "
                          f"model.max_len={max_len}: shorten it")
    return ids


def read_run_config(run_dir: Path | str) -> TrainConfig:
    """The training config a run was launched with (Hydra's `.hydra/config.yaml` in the run dir)."""
    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"checkpoint={run_dir} has no .hydra/config.yaml: point it at a run dir "
                          "written by python -m jaxformer.train")
    try:
        schema = OmegaConf.structured(TrainConfig)
        return to_train_config(OmegaConf.merge(schema, OmegaConf.load(path)))
    except ConfigError as err:
        raise ConfigError(f"the config of {path} is not valid today: {err}") from None
    except Exception as err:
        raise ConfigError(f"cannot read {path}: {str(err).splitlines()[0]}") from None


def require_generative(model_cfg: ModelConfig, run_dir: Path | str, app: str) -> None:
    if model_cfg.kind not in ("decoder", "encoder_decoder"):
        raise ConfigError(f"checkpoint={run_dir} holds an {model_cfg.kind} model, which cannot "
                          f"generate text: {app} needs a decoder or encoder_decoder run")
