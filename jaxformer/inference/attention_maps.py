"""What `python -m jaxformer.inspect` does: attention maps of a trained run (with lens=true, the
logit lens of inference/lens_report.py instead).

Restores a run's parameters (any model family), runs one forward over `text` with the attention
weights captured, and writes one PNG per layer and attention kind (self / cross): one panel per
head, tokens on both axes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import MISSING
from tokenizers import Tokenizer

from jaxformer.config import ModelConfig, check_step
from jaxformer.data.tokenizers import BOS_ID, encode_text
from jaxformer.errors import UserError
from jaxformer.models.instrument import ATTENTION_WEIGHTS, instrument
from jaxformer.runs import RunDir


@dataclass
class InspectConfig:
    checkpoint: str = MISSING  # a run dir written by `python -m jaxformer.train`
    text: str = MISSING  # the decoder/encoder input; the source of an encoder-decoder
    target: Optional[str] = None  # encoder-decoder only: target text (None: just <bos>; with
    #                               lens=true the greedy answer)
    step: Optional[int] = None  # checkpoint step; None: the latest
    out_dir: Optional[str] = None  # None: RUN_DIR/inspect
    lens: bool = False  # the logit lens and direct logit attribution (inference/lens_report.py)
    #                     instead of attention maps
    answer: Optional[str] = None  # lens=true, decoder: the answer after text (None: greedy)

    def __post_init__(self) -> None:
        if not self.text.strip():
            raise UserError("text is empty: pass the text to inspect, e.g. text=12+34=")
        if self.target is not None and not self.target.strip():
            raise UserError("target is empty: give a target text or drop it (then <bos> alone)")
        if self.answer is not None and not self.lens:
            raise UserError("answer is read by the logit lens: add lens=true or drop answer")
        if self.answer is not None and not self.answer.strip():
            raise UserError("answer is empty: give the answer text or drop it (then the model's "
                            "greedy answer)")
        check_step(self.step)
        RunDir.open(self.checkpoint)

    @property
    def output_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir else Path(self.checkpoint) / "inspect"


# -- tokens ---------------------------------------------------------------------------------------
def token_labels(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    # visible stand-ins, so a space or a newline still gets a readable tick label
    return [tokenizer.id_to_token(i).replace(" ", "\u2423").replace("\n", "\\n") for i in ids]


# -- capture --------------------------------------------------------------------------------------
@dataclass
class AttentionMap:
    name: str  # file stem, e.g. decoder_layer00_cross
    title: str
    weights_hqk: np.ndarray  # (heads, queries, keys); rows sum to 1
    query_tokens: list[str]
    key_tokens: list[str]


def capture_forward(model: nnx.Module, model_inputs: tuple) -> nnx.State:
    """The attention weights one jitted forward of an instrumented copy of `model` sows (one
    compile beats eager op-by-op dispatch); `model` itself is untouched."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, model_inputs):
        copy = instrument(nnx.merge(graphdef, state), ATTENTION_WEIGHTS)
        copy(*model_inputs)
        return nnx.pop(copy, nnx.Intermediate)

    return forward(state, model_inputs)


def attention_maps(model: nnx.Module, model_cfg: ModelConfig, tokenizer: Tokenizer, text: str,
                   target: str | None = None) -> list[AttentionMap]:
    """One forward with captured weights; one map per stack, layer and attention kind.

    Inputs are framed as the training pipelines frame them: decoder `<bos> text`, encoder
    `<bos> text <eos>`, encoder-decoder source `text <eos>` and target `<bos> target`.
    """
    kind, max_len = model_cfg.kind, model_cfg.max_len
    if target is not None and kind != "encoder_decoder":
        raise UserError(f"target is only for encoder_decoder models, this run is a {kind}: "
                          "drop it")
    if kind == "encoder_decoder":
        src = encode_text(tokenizer, text, "text", bos=False, eos=True, max_len=max_len)
        tgt = encode_text(tokenizer, target, "target", bos=True, eos=False, max_len=max_len) \
            if target is not None else [BOS_ID]
        model_inputs = (jnp.asarray([src]), None, jnp.asarray([tgt]))
    else:
        src = tgt = encode_text(tokenizer, text, "text", bos=True, eos=kind == "encoder",
                                max_len=max_len)
        model_inputs = (jnp.asarray([src]),)
    src_tokens, tgt_tokens = token_labels(tokenizer, src), token_labels(tokenizer, tgt)

    captured = capture_forward(model, model_inputs)
    maps = []
    # single-stack models call their stack `stack`; an encoder-decoder has `encoder`, `decoder`
    for stack_name in sorted(captured.keys(), key=lambda name: name != "encoder"):
        prefix = kind if stack_name == "stack" else stack_name
        queries = src_tokens if stack_name == "encoder" else tgt_tokens
        blocks = captured[stack_name]["blocks"]  # weights stacked on a leading layer axis
        n_layers = len(blocks["attention"]["attention_weights"].get_value()[-1])
        for layer in range(n_layers):
            for module_name in ("attention", "cross_attention"):
                if module_name not in blocks:
                    continue
                weights_lbhqk = blocks[module_name]["attention_weights"].get_value()[-1]
                attention_kind = "cross" if module_name == "cross_attention" else "self"
                keys = src_tokens if attention_kind == "cross" else queries
                maps.append(AttentionMap(
                    name=f"{prefix}_layer{layer:02d}_{attention_kind}",
                    title=f"{prefix} layer {layer} {attention_kind}-attention",
                    weights_hqk=np.asarray(weights_lbhqk[layer, 0], np.float32),
                    query_tokens=queries, key_tokens=keys,
                ))
    return maps


# -- plots ----------------------------------------------------------------------------------------
MAX_TICKS = 64  # beyond this many tokens, label every k-th one


def plot_attention(attention: AttentionMap, path: Path, subtitle: str = "") -> Path:
    """Heads as panels of a grid, queries down, keys across, one shared colorbar."""
    n_heads, n_queries, n_keys = attention.weights_hqk.shape
    cols = min(n_heads, 4)
    rows = math.ceil(n_heads / cols)
    cell = min(0.3, 8.0 / max(n_queries, n_keys))  # inches per token: square cells, capped panels
    panel_w = max(cell * n_keys, 1.2) + 0.9  # + room for the query labels
    panel_h = cell * n_queries + 1.3  # + room for the title and the key labels
    fig = Figure(figsize=(cols * panel_w + 1.2, rows * panel_h + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    fontsize = 8 if max(n_queries, n_keys) <= 32 else 6
    image = None
    for head, ax in enumerate(axes.flat):
        if head >= n_heads:
            ax.set_axis_off()
            continue
        image = ax.imshow(attention.weights_hqk[head], vmin=0.0, vmax=1.0, cmap="viridis",
                          interpolation="nearest")
        ax.set_title(f"head {head}", fontsize=9)
        for axis, tokens in ((ax.xaxis, attention.key_tokens), (ax.yaxis, attention.query_tokens)):
            every = math.ceil(len(tokens) / MAX_TICKS)
            axis.set_ticks(range(0, len(tokens), every), tokens[::every], fontsize=fontsize)
        ax.tick_params(axis="x", labelrotation=90)
        ax.set_xlabel("key", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9, label="attention weight")
    fig.suptitle(f"{attention.title}{subtitle}", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def inspect_run(config: InspectConfig) -> list[Path]:
    """Restore the run, capture attention over the configured text, write one PNG per map."""
    run = RunDir.open(config.checkpoint).restore(config.step)
    maps = attention_maps(run.model, run.model_cfg, run.tokenizer, config.text, config.target)
    subtitle = f"  ({Path(config.checkpoint).absolute().name}, step {run.step})"
    try:
        return [plot_attention(m, config.output_dir / f"{m.name}.png", subtitle) for m in maps]
    except OSError as err:
        raise UserError(f"out_dir={config.output_dir} is not writable ({err.strerror}): "
                          "choose another out_dir") from err
