"""What `python -m jaxformer.inspect checkpoint=RUN_DIR text=... lens=true` does: the logit lens
and direct logit attribution (inference/lens.py) of a trained run over `text` and its answer.

The model reads its prompt and an answer (given, `answer=` for a decoder or `target=` for an
encoder-decoder, else its own greedy one), teacher-forced; the target at each position is the next
token (after the answer: `<eos>`). Written into out_dir:
  logit_lens.png            layers x positions, colour: the lens's probability of the target,
                            text: the lens's top token (bold where it is the target)
  logit_lens.md             the same as a table, the layer each target settles at, and the
                            direct logit attribution of the answer positions
  logit_lens.csv            per layer and position: target probability and rank, top-5 tokens
  logit_attribution.csv     per part and position: its share of the target's logit
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tokenizers import Tokenizer

from jaxformer.config import ModelConfig
from jaxformer.data.tokenizers import BOS_ID, encode_text, eos_id
from jaxformer.errors import UserError
from jaxformer.inference.activation_cache import run_with_cache
from jaxformer.inference.attention_maps import InspectConfig, token_labels
from jaxformer.inference.lens import (
    LogitAttribution, LogitLens, direct_logit_attribution, logit_lens,
)
from jaxformer.models.decoding import generate, generate_seq2seq, until_eos
from jaxformer.runs import RunDir

TOP_K = 5


@dataclass(frozen=True)
class LensInput:
    model_inputs: tuple  # what the model's __call__ takes (one row)
    input_ids: list[int]  # the stream's tokens (the decoder's, for an encoder-decoder)
    target_ids: list[int]  # the next token at each position
    answer_start: int  # the first position whose target is an answer token
    answer_given: bool  # False: the answer is the model's greedy one


def lens_input(model, model_cfg: ModelConfig, tokenizer: Tokenizer, text: str,
               answer: str | None = None, target: str | None = None) -> LensInput:
    """Prompt and answer framed as in training (decoder `<bos> text answer`, encoder-decoder
    source `text <eos>`, decoder input `<bos> target`), targets shifted by one, `<eos>` last."""
    kind, max_len = model_cfg.kind, model_cfg.max_len
    eos = eos_id(tokenizer, "the run's tokenizer")
    if kind == "decoder":
        if target is not None:
            raise UserError("target is for encoder_decoder runs; a decoder's lens reads the "
                            "continuation of text from answer=")
        prompt = encode_text(tokenizer, text, "text", bos=True, eos=False, max_len=max_len)
        answer_ids = (greedy(model, prompt, (), max_len, eos) if answer is None
                      else encode_text(tokenizer, answer, "answer", bos=False, eos=False,
                                       max_len=max_len))
        source = ()
    elif kind == "encoder_decoder":
        if answer is not None:
            raise UserError("answer is for decoder runs; an encoder_decoder's lens reads the "
                            "target text from target=")
        src = encode_text(tokenizer, text, "text", bos=False, eos=True, max_len=max_len)
        source = (jnp.asarray([src]), None)
        prompt = [BOS_ID]
        answer_ids = (greedy(model, prompt, source, max_len, eos) if target is None
                      else encode_text(tokenizer, target, "target", bos=False, eos=False,
                                       max_len=max_len))
    else:
        raise UserError(f"the logit lens reads a next-token output layer: a {kind} run has none "
                        "(use a decoder or encoder_decoder run, or drop lens=true)")
    sequence = prompt + answer_ids + [eos]
    if len(sequence) - 1 > max_len:
        raise UserError(f"text and answer are {len(sequence) - 1} tokens with <bos> but "
                        f"model.max_len={max_len}: shorten them")
    inputs = jnp.asarray([sequence[:-1]])
    model_inputs = (*source, inputs) if source else (inputs,)
    return LensInput(model_inputs, sequence[:-1], sequence[1:], len(prompt) - 1,
                     answer is not None or target is not None)


def greedy(model, prompt: list[int], source: tuple, max_len: int, eos: int) -> list[int]:
    """The model's greedy continuation of `prompt` (ids up to `<eos>`)."""
    room = max_len - len(prompt)
    if room < 1:
        raise UserError(f"text takes all model.max_len={max_len} positions, leaving none for "
                        "the answer: shorten it")
    kwargs = dict(max_new_tokens=room, temperature=0.0, stop_tokens=(eos,))
    done = (generate_seq2seq(model, *source, **kwargs) if source
            else generate(model, np.asarray([prompt]), np.asarray([len(prompt)]), **kwargs))
    length = int(done.lengths[0, 0])
    return until_eos(np.asarray(done.tokens[0, 0, :length]).tolist(), eos)


# -- the app --------------------------------------------------------------------------------------
def lens_run(config: InspectConfig) -> list[Path]:
    """Restore the run, read the lens (and, where the stream is additive, the attribution) over
    the configured text, write the figure and the tables."""
    run = RunDir.open(config.checkpoint).restore(config.step)
    framed = lens_input(run.model, run.model_cfg, run.tokenizer, config.text, config.answer,
                        config.target)
    _, cache = run_with_cache(run.model, *framed.model_inputs)
    target_ids_bt = np.asarray([framed.target_ids])
    lens = logit_lens(run.model, cache, target_ids_bt, TOP_K)
    try:
        attribution, why_not = direct_logit_attribution(run.model, cache, target_ids_bt), None
    except UserError as err:  # a post-norm or residual-free stack is no sum of parts
        attribution, why_not = None, str(err)
    title = f"{Path(config.checkpoint).absolute().name}, step {run.step}"
    out = config.output_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
        paths = [plot_lens(lens, framed, run.tokenizer, out / "logit_lens.png", title),
                 write_markdown(lens, attribution, why_not, framed, run.tokenizer,
                                out / "logit_lens.md", title),
                 write_lens_csv(lens, framed, run.tokenizer, out / "logit_lens.csv")]
        if attribution is not None:
            paths.append(write_attribution_csv(attribution, framed, run.tokenizer,
                                               out / "logit_attribution.csv"))
    except OSError as err:
        raise UserError(f"out_dir={out} is not writable ({err.strerror}): choose another "
                        "out_dir") from err
    return paths


# -- figure ---------------------------------------------------------------------------------------
def plot_lens(lens: LogitLens, framed: LensInput, tokenizer: Tokenizer, path: Path,
              title: str) -> Path:
    """Layers up (embeddings at the bottom), positions across; inputs below, targets above."""
    probs_lt = lens.target_probs_lbt[:, 0]
    tops_lt = lens.top_ids_lbtk[:, 0, :, 0]
    n_layers, n_positions = probs_lt.shape
    fig = Figure(figsize=(1.6 + 0.42 * n_positions, 1.5 + 0.42 * n_layers), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(np.nan_to_num(probs_lt), origin="lower", vmin=0.0, vmax=1.0, cmap="viridis",
                      aspect="auto", interpolation="nearest")
    for layer in range(n_layers):
        for pos in range(n_positions):
            hit = tops_lt[layer, pos] == framed.target_ids[pos]
            ax.text(pos, layer, token_labels(tokenizer, [int(tops_lt[layer, pos])])[0],
                    ha="center", va="center", fontsize=7, fontweight="bold" if hit else "normal",
                    color="black" if probs_lt[layer, pos] > 0.6 else "white")
    ax.set_yticks(range(n_layers), lens.layers, fontsize=8)
    ax.set_xticks(range(n_positions), token_labels(tokenizer, framed.input_ids), fontsize=8)
    ax.set_xlabel("input token", fontsize=8)
    top = ax.secondary_xaxis("top")
    top.set_xticks(range(n_positions), token_labels(tokenizer, framed.target_ids), fontsize=8)
    top.set_xlabel("target (next token)", fontsize=8)
    ax.axvline(framed.answer_start - 0.5, color="white", linewidth=1.0, linestyle="--")
    fig.colorbar(image, ax=ax, shrink=0.9, label="lens probability of the target")
    fig.suptitle(f"logit lens ({title}); text: top token", fontsize=9)
    fig.savefig(path, dpi=100)
    return path


# -- tables ---------------------------------------------------------------------------------------
def write_markdown(lens: LogitLens, attribution: LogitAttribution | None, why_not: str | None,
                   framed: LensInput, tokenizer: Tokenizer, path: Path, title: str) -> Path:
    inputs = token_labels(tokenizer, framed.input_ids)
    targets = token_labels(tokenizer, framed.target_ids)
    positions = range(len(inputs))
    settled = lens.settled_layers()[0]
    answer = "given" if framed.answer_given else "the model's greedy answer"
    lines = [f"# Logit lens ({title})", "",
             f"Input `{''.join(inputs)}`, answer from position {framed.answer_start} ({answer}). "
             "Each cell: the lens's top token and its probability, then the target's "
             "probability and rank (1: top).", "",
             "| layer | " + " | ".join(f"{p}: `{inputs[p]}`→`{targets[p]}`" for p in positions)
             + " |", "|---" * (len(inputs) + 1) + "|"]
    for layer, name in enumerate(lens.layers):
        cells = [f"`{label(tokenizer, lens.top_ids_lbtk[layer, 0, p, 0])}` "
                 f"{lens.top_probs_lbtk[layer, 0, p, 0]:.2f}; "
                 f"{lens.target_probs_lbt[layer, 0, p]:.2f} #{lens.target_ranks_lbt[layer, 0, p]}"
                 for p in positions]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| settles at | " + " | ".join(
        lens.layers[s] if s >= 0 else "never" for s in settled) + " |")
    lines += ["", "'settles at': the first layer from which the target is the top token at "
              "every later layer.", "", "## Direct logit attribution", ""]
    if attribution is None:
        lines.append(f"Not computed: {why_not}")
    else:
        answer_positions = range(framed.answer_start, len(inputs))
        lines += ["Each part's share of the target's logit at the answer positions, the final "
                  "norm's scale frozen at the final stream's (LayerNorm's centring and gain "
                  "applied to each part, its shift the 'bias' row): the parts sum to the logit "
                  "(before a final soft cap).", "",
                  "| part | " + " | ".join(f"{p}: →`{targets[p]}`" for p in answer_positions)
                  + " |", "|---" * (len(answer_positions) + 1) + "|"]
        for name, row in zip(attribution.names, attribution.contributions_cbt[:, 0]):
            lines.append(f"| {name} | " + " | ".join(f"{row[p]:+.2f}" for p in answer_positions)
                         + " |")
        lines.append("| **logit** | " + " | ".join(f"{attribution.logit_bt[0, p]:.2f}"
                                                   for p in answer_positions) + " |")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_lens_csv(lens: LogitLens, framed: LensInput, tokenizer: Tokenizer, path: Path) -> Path:
    header = ["layer", "position", "input", "target", "target_prob", "target_rank"]
    header += [f"{what}{i}" for i in range(1, lens.top_ids_lbtk.shape[-1] + 1)
               for what in ("top", "prob")]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for layer, name in enumerate(lens.layers):
            for p, (input_id, target_id) in enumerate(zip(framed.input_ids, framed.target_ids)):
                tops = [value for token, prob in zip(lens.top_ids_lbtk[layer, 0, p],
                                                     lens.top_probs_lbtk[layer, 0, p])
                        for value in (label(tokenizer, token), f"{prob:.4f}")]
                writer.writerow([name, p, label(tokenizer, input_id), label(tokenizer, target_id),
                                 f"{lens.target_probs_lbt[layer, 0, p]:.4f}",
                                 int(lens.target_ranks_lbt[layer, 0, p]), *tops])
    return path


def write_attribution_csv(attribution: LogitAttribution, framed: LensInput,
                          tokenizer: Tokenizer, path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["part", "position", "input", "target", "contribution", "logit"])
        for name, row in zip(attribution.names, attribution.contributions_cbt[:, 0]):
            for p, (input_id, target_id) in enumerate(zip(framed.input_ids, framed.target_ids)):
                writer.writerow([name, p, label(tokenizer, input_id), label(tokenizer, target_id),
                                 f"{row[p]:.5f}", f"{attribution.logit_bt[0, p]:.5f}"])
    return path


def label(tokenizer: Tokenizer, token_id) -> str:
    return token_labels(tokenizer, [int(token_id)])[0]
