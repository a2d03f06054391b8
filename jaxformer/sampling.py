"""Autoregressive decoding for the generative families (decoder, encoder-decoder).

`generate` fills a fixed (B, T) buffer position by position inside one jitted `lax.fori_loop`,
re-running the model on the whole buffer each step (causality makes positions past t irrelevant).
Prompts of different lengths share the batch: a position is written only once it is past the prompt.
The encoder-decoder encodes its source once and decodes the target buffer the same way.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.data.tokenizers import BOS_ID, PAD_ID


def sample_logits(key: jax.Array, logits_bv: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Token ids from logits: argmax when temperature is 0, else a softmax(logits / T) draw."""
    if temperature == 0.0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits_bv / temperature, axis=-1).astype(jnp.int32)


def _fill(logits_fn: Callable, buffer_bt, prompt_lens_b, key, total_len: int, temperature: float):
    """Sample buffer positions prompt_len .. total_len - 1, one per step, from `logits_fn(buffer)`."""
    def step(pos, carry):
        buffer_bt, key = carry
        key, sample_key = jax.random.split(key)
        next_b = sample_logits(sample_key, logits_fn(buffer_bt)[:, pos], temperature)
        write_b = pos + 1 >= prompt_lens_b  # still inside the prompt: keep the prompt token
        buffer_bt = buffer_bt.at[:, pos + 1].set(jnp.where(write_b, next_b, buffer_bt[:, pos + 1]))
        return buffer_bt, key

    start = jnp.min(prompt_lens_b) - 1
    return jax.lax.fori_loop(start, total_len - 1, step, (buffer_bt, key))[0]


@partial(jax.jit, static_argnames=("graphdef", "total_len", "temperature"))
def _generate(graphdef, state, prompts_bp, prompt_lens_b, key, total_len: int, temperature: float):
    model = nnx.merge(graphdef, state)
    batch, prompt_width = prompts_bp.shape
    buffer_bt = jnp.full((batch, total_len), PAD_ID, jnp.int32).at[:, :prompt_width].set(prompts_bp)
    return _fill(model, buffer_bt, prompt_lens_b, key, total_len, temperature)


@partial(jax.jit, static_argnames=("graphdef", "total_len", "temperature"))
def _generate_seq2seq(graphdef, state, src_bs, src_valid_bs, key, total_len: int, temperature: float):
    model = nnx.merge(graphdef, state)
    memory_bsd = model.encode(src_bs, src_valid_bs)
    batch = src_bs.shape[0]
    buffer_bt = jnp.full((batch, total_len), PAD_ID, jnp.int32).at[:, 0].set(BOS_ID)
    logits_fn = lambda tgt_bt: model.decode(tgt_bt, memory_bsd, src_valid_bs)  # noqa: E731
    return _fill(logits_fn, buffer_bt, jnp.ones((batch,), jnp.int32), key, total_len, temperature)


def _check_context(total_len: int, max_len: int) -> None:
    if total_len > max_len:
        raise ValueError(
            f"prompt + new tokens = {total_len} exceeds model.max_len={max_len}: "
            "generate fewer tokens or train with a larger model.max_len"
        )


def generate(
    model: nnx.Module, prompts_bp, prompt_lens_b, total_len: int, key: jax.Array | None = None,
    temperature: float = 0.0,
) -> jax.Array:
    """Complete right-padded prompts up to `total_len` tokens (prompt included)."""
    _check_context(total_len, model.max_len)
    key = jax.random.key(0) if key is None else key
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, jnp.asarray(prompts_bp), jnp.asarray(prompt_lens_b), key,
                     total_len, float(temperature))


def generate_seq2seq(
    model: nnx.Module, src_bs, src_valid_bs, total_len: int, key: jax.Array | None = None,
    temperature: float = 0.0,
) -> jax.Array:
    """Target tokens (B, total_len) for each source: <bos> then sampled tokens."""
    _check_context(total_len, model.max_len)
    key = jax.random.key(0) if key is None else key
    graphdef, state = nnx.split(model)
    return _generate_seq2seq(graphdef, state, jnp.asarray(src_bs), jnp.asarray(src_valid_bs), key,
                             total_len, float(temperature))
