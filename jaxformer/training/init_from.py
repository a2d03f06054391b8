"""Starting a run from pretrained weights: `finetune.init_from` names a jaxformer run dir or a
Hugging Face folder (BERT -> encoder; GPT-2, Llama, Qwen3 -> decoder).

The run's own model config decides the model; the source fills every parameter it has with the
same path and shape. Parameters the source lacks (a new classification head) keep their fresh
initialisation, source parameters this model lacks are skipped, and a shape mismatch is an error
unless `finetune.allow_shape_mismatch` re-initialises those parameters. Sources must compute the
same function (family, heads, activation, norms, ...): otherwise the weights would mean nothing.

Vocabulary: token ids are never reinterpreted. Rows of vocabulary-indexed parameters (the token
table, the masked-LM bias) are matched by token *string* between the source's tokenizer and the
run's: a character task reusing a pretraining run's alphabet gets every row, "0".."9" find their
BERT / GPT-2 / Llama / Qwen3 tokens, jaxformer's specials map to [PAD] [CLS] [SEP] [UNK] [MASK]
(GPT-2 and Qwen3: <|endoftext|> for <bos>/<eos>; Llama: <s> </s> <unk>, Llama 3:
<|begin_of_text|> <|end_of_text|>), and rows with no counterpart stay freshly initialised
(reported).

Everything is read and checked before the train step compiles; `apply_init` then writes the values
into the freshly initialised, sharded train state (one `make_array_from_callback` per parameter).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
from flax import nnx, traverse_util
from tokenizers import Tokenizer

from jaxformer.config import COMPUTES, FinetuneConfig, ModelConfig
from jaxformer.errors import UserError
from jaxformer.interop import DECODER_TYPES, InteropError, read_hf_decoder, read_hf_encoder
from jaxformer.interop.params import model_params
from jaxformer.interop.safetensors_io import read_hf_config
from jaxformer.parallel import to_host
from jaxformer.runs import CHECKPOINTS, restore_run
from jaxformer.training.state import TrainState

log = logging.getLogger(__name__)

HF_READERS = {"bert": read_hf_encoder, **dict.fromkeys(DECODER_TYPES, read_hf_decoder)}
# the source's names for jaxformer's special tokens, the first one the source has wins: BERT;
# Llama 3; GPT-2 and Qwen3; Llama 1/2 (whose <unk> is ours); a byte-level BPE may hold "<s>" as
# plain text, so the reserved names come first
SPECIAL_ALIASES = {
    "<pad>": ("[PAD]",), "<bos>": ("[CLS]", "<|begin_of_text|>", "<|endoftext|>", "<s>"),
    "<eos>": ("[SEP]", "<|end_of_text|>", "<|endoftext|>", "</s>"), "<unk>": ("[UNK]",),
    "<mask>": ("[MASK]",),
}
VOCAB_AXIS = "vocab"
SHOWN_TOKENS = 8


@dataclass
class Source:
    description: str
    model_cfg: ModelConfig
    params: dict[str, np.ndarray]  # dotted path -> value: only what the source really holds
    tokenizer: Tokenizer | None


def open_source(init_from: str, step: int | None) -> Source:
    """Read a run dir's (partial restore: parameters only) or a Hugging Face folder's weights."""
    key = f"finetune.init_from={init_from}"
    path = Path(init_from)
    if not path.exists():
        raise UserError(f"{key} does not exist: give a run dir written by jaxformer.train or a "
                        "Hugging Face model folder")
    if not path.is_dir():
        raise UserError(f"{key} is not a folder: give a run dir or a Hugging Face model folder")
    try:
        if (path / CHECKPOINTS).is_dir():
            run = restore_run(path, step, key="finetune.init_from")
            return Source(f"jaxformer run {path} (step {run.step})", run.model_cfg,
                          model_params(run.model), run.tokenizer)
        if not (path / "config.json").is_file():
            raise UserError(f"{key} is neither a jaxformer run dir (no checkpoints/) nor a "
                            "Hugging Face folder (no config.json)")
        if step is not None:
            raise UserError(f"finetune.init_step={step} is for run dirs, but {path} is a Hugging "
                            "Face folder: set finetune.init_step=null")
        model_type = read_hf_config(path).get("model_type")
        if model_type not in HF_READERS:
            raise UserError(f"{key} is a Hugging Face {model_type!r} folder: jaxformer starts "
                            f"from bert (encoder) and {', '.join(DECODER_TYPES)} (decoder) folders")
        model_cfg, params, tokenizer = HF_READERS[model_type](path)
        return Source(f"Hugging Face {model_type} folder {path}", model_cfg, params, tokenizer)
    except (InteropError, UserError) as err:
        message = str(err)
        raise UserError(message if message.startswith("finetune.") else f"{key}: {message}") \
            from err
    except OSError as err:
        raise UserError(f"{key} cannot be read ({err.strerror}: {err.filename})") from err


def check_architecture(source: ModelConfig, model: ModelConfig, where: str) -> None:
    """Refuse a source that computes a different function from its weights than this model."""
    if source.kind != model.kind:
        raise UserError(f"finetune.init_from={where} holds a {source.kind} model but model.kind="
                        f"{model.kind}: weights start a model of their own family (set "
                        f"model={source.kind} to use this source)")

    def value(cfg: ModelConfig, name: str):
        return cfg.use_final_norm if name == "final_norm" else getattr(cfg, name)

    names = [name for name in ModelConfig.fields_with_role(COMPUTES)
             if name != "rope_theta" or model.positions == "rope"]
    differ = [f"model.{name}={value(source, name)!r} there, {value(model, name)!r} here"
              for name in names if value(source, name) != value(model, name)]
    if differ:
        raise UserError(f"finetune.init_from={where} was built with another architecture "
                        f"({'; '.join(differ)}): set the same values")


def token_rows(target: Tokenizer, target_rows: int, source: Tokenizer | None,
               source_rows: int) -> np.ndarray | None:
    """For each target vocabulary row, the source row of the same token (-1: none). Without a
    source tokenizer only equal vocabularies map (by id); None means they cannot."""
    if source is None:
        return np.arange(target_rows) if target_rows == source_rows else None
    vocab = source.get_vocab()
    rows = []
    for index in range(target_rows):
        token = target.id_to_token(index)
        names = () if token is None else (token, *SPECIAL_ALIASES.get(token, ()))
        rows.append(next((vocab[n] for n in names if vocab.get(n, source_rows) < source_rows), -1))
    return np.asarray(rows)


@dataclass
class InitPlan:
    """What `apply_init` writes, decided (and reported) before anything compiles."""

    source: str
    values: dict[str, np.ndarray] = field(default_factory=dict)  # path -> the whole value
    vocab_rows: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)  # path -> (axis, rows)
    loaded: list[str] = field(default_factory=list)
    by_token: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)

    def report(self) -> list[str]:
        counts = (f"{len(self.loaded)} loaded, {len(self.by_token)} loaded by token, "
                  f"{len(self.new)} new, {len(self.skipped)} skipped, "
                  f"{len(self.reinitialised)} re-initialised (shape mismatch)")
        lines = [f"init_from {self.source}: {counts}"]
        for title, entries in (
            ("loaded", by_module(self.loaded)), ("loaded by token", self.by_token),
            ("newly initialised (not in the source)", self.new),
            ("skipped (in the source, not in this model)", self.skipped),
            ("re-initialised (shape mismatch, allowed)", self.reinitialised),
        ):
            if entries:
                lines.append(f"  {title}: {', '.join(entries)}")
        return lines


def plan_init(cfg: FinetuneConfig, model_cfg: ModelConfig, tokenizer: Tokenizer,
              abstract_params: nnx.State) -> InitPlan:
    """Read the source and match it to this model's parameters (abstract: shapes and axis names)."""
    source = open_source(cfg.init_from, cfg.init_step)
    check_architecture(source.model_cfg, model_cfg, cfg.init_from)
    plan = InitPlan(source.description)
    mismatched = []
    targets = traverse_util.flatten_dict(
        nnx.to_pure_dict(abstract_params), sep=".")  # path -> ShapeDtypeStruct
    axes = {".".join(str(k) for k in path): leaf.get_metadata("out_sharding", None) or ()
            for path, leaf in nnx.to_flat_state(abstract_params)}
    for path, target in sorted(targets.items()):
        shape = tuple(target.shape)
        if path not in source.params:
            plan.new.append(f"{path} {shape}")
            continue
        value = source.params[path]
        if VOCAB_AXIS in axes[path]:
            axis = axes[path].index(VOCAB_AXIS)
            rows = token_rows(tokenizer, shape[axis], source.tokenizer, value.shape[axis])
            rest_matches = np.delete(value.shape, axis).tolist() == np.delete(shape, axis).tolist()
            if rows is not None and rest_matches:
                plan.values[path] = value
                if value.shape == shape and (rows == np.arange(len(rows))).all():
                    plan.loaded.append(path)
                else:
                    plan.vocab_rows[path] = (axis, rows)
                    plan.by_token.append(describe_rows(path, rows, tokenizer))
                continue
        elif tuple(value.shape) == shape:
            plan.values[path] = value
            plan.loaded.append(path)
            continue
        mismatched.append(f"{path}: {tuple(value.shape)} there, {shape} here")
    plan.skipped = [f"{path} {tuple(value.shape)}" for path, value in sorted(source.params.items())
                    if path not in targets]
    if mismatched and not cfg.allow_shape_mismatch:
        raise UserError(f"finetune.init_from={cfg.init_from}: {len(mismatched)} parameter(s) "
                        f"differ in shape ({'; '.join(mismatched[:3])}): match the model config "
                        "or set finetune.allow_shape_mismatch=true to re-initialise them")
    plan.reinitialised = mismatched
    if not plan.values:
        raise UserError(f"finetune.init_from={cfg.init_from}: no parameter of the source fits "
                        "this model")
    return plan


def by_module(paths: list[str]) -> list[str]:
    """Paths, with a top-level module's several parameters shown as one `module.* (count)`."""
    modules: dict[str, list[str]] = {}
    for path in paths:
        modules.setdefault(path.split(".")[0], []).append(path)
    return [group[0] if len(group) == 1 else f"{module}.* ({len(group)} tensors)"
            for module, group in modules.items()]


def describe_rows(path: str, rows: np.ndarray, tokenizer: Tokenizer) -> str:
    missing = [tokenizer.id_to_token(i) or f"#{i}" for i in np.flatnonzero(rows < 0)]
    shown = ", ".join(map(repr, missing[:SHOWN_TOKENS])) + (", ..." if len(missing) > SHOWN_TOKENS
                                                           else "")
    return (f"{path} ({len(rows) - len(missing)} of {len(rows)} rows"
            + (f"; new: {shown})" if missing else ")"))


def apply_init(state: TrainState, plan: InitPlan) -> TrainState:
    """The fresh state with the planned values written into its (sharded) parameters."""
    params = traverse_util.flatten_dict(nnx.to_pure_dict(state.params), sep=".")
    for path, value in plan.values.items():
        current = params[path]
        if path in plan.vocab_rows:  # rows without a source token keep their fresh values
            axis, rows = plan.vocab_rows[path]
            gathered = np.take(value, np.maximum(rows, 0), axis=axis)
            keep_fresh = np.expand_dims(rows < 0, [d for d in range(value.ndim) if d != axis])
            value = np.where(keep_fresh, to_host(current), gathered)
        value = np.asarray(value, current.dtype)
        params[path] = jax.make_array_from_callback(value.shape, current.sharding,
                                                    lambda index, v=value: v[index])
    nnx.replace_by_pure_dict(state.params, traverse_util.unflatten_dict(params, sep="."))
    for line in plan.report():
        log.info(line)
    return state
