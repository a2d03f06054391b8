"""Scaled dot-product attention and multi-head attention with causal and padding masks; the KV
cache decoding reads and writes.

Masks are boolean and broadcast to (batch, heads, queries, keys); True means "may attend".
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.layers import apply_rope, dense
from jaxformer.parallel import constrain


def causal_mask(length: int) -> jax.Array:
    """(1, 1, T, T): query t sees keys 0..t."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def padding_mask(valid_bs: jax.Array) -> jax.Array:
    """(B, 1, 1, S): keys that are real tokens (not padding)."""
    return valid_bs.astype(bool)[:, None, None, :]


def cache_mask(positions_bt: jax.Array, width: int) -> jax.Array:
    """(B, 1, T, W): a query at absolute position p sees cache slots 0..p (slot = position)."""
    return (jnp.arange(width) <= positions_bt[:, :, None])[:, None]


class KVCache(NamedTuple):
    """Keys and values (B, heads, W, head_dim) of one attention layer, head-major so attention
    over them needs no transposes; slot w holds position w."""

    k: jax.Array
    v: jax.Array

    def write(self, k_bhtd: jax.Array, v_bhtd: jax.Array, start_b: jax.Array) -> KVCache:
        """Row b's T new keys/values land in slots start_b[b] .. start_b[b] + T - 1 (rows of a
        right-padded batch sit at their own positions, so each row has its own start)."""
        def write_rows(cache_bhwd, new_bhtd):
            return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice(c, n, (0, i, 0)))(
                cache_bhwd, new_bhtd.astype(cache_bhwd.dtype), start_b)
        return KVCache(write_rows(self.k, k_bhtd), write_rows(self.v, v_bhtd))


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = jnp.logical_and(out, m)
    return out


def head_major_attention(
    q_bhtd: jax.Array, k_bhsd: jax.Array, v_bhsd: jax.Array,
    mask: jax.Array | None = None, scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """softmax(Q K^T * scale) V spelled out on head-major arrays (the KV cache's layout, whose
    batched matmuls need no transposes); returns (output_bhtd, weights_bhts)."""
    scale = 1.0 / math.sqrt(q_bhtd.shape[-1]) if scale is None else scale
    scores_bhts = jnp.einsum("bhtd,bhsd->bhts", q_bhtd, k_bhsd) * scale
    if mask is not None:
        scores_bhts = jnp.where(mask, scores_bhts, jnp.finfo(scores_bhts.dtype).min)
    weights_bhts = jax.nn.softmax(scores_bhts.astype(jnp.float32), axis=-1).astype(v_bhsd.dtype)
    return jnp.einsum("bhts,bhsd->bhtd", weights_bhts, v_bhsd), weights_bhts


def to_head_major(x_bthd: jax.Array) -> jax.Array:
    """(B, T, H, D) <-> (B, H, T, D)."""
    return jnp.swapaxes(x_bthd, 1, 2)


def reference_attention(
    q_bthd: jax.Array, k_bshd: jax.Array, v_bshd: jax.Array,
    mask: jax.Array | None = None, scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """softmax(Q K^T * scale) V spelled out; returns (output_bthd, weights_bhts)."""
    out_bhtd, weights_bhts = head_major_attention(
        to_head_major(q_bthd), to_head_major(k_bshd), to_head_major(v_bshd), mask, scale)
    return to_head_major(out_bhtd), weights_bhts


def dot_product_attention(
    q_bthd: jax.Array, k_bshd: jax.Array, v_bshd: jax.Array,
    mask: jax.Array | None = None, scale: float | None = None, implementation: str = "xla",
) -> jax.Array:
    if implementation == "reference":
        return reference_attention(q_bthd, k_bshd, v_bshd, mask, scale)[0]
    return jax.nn.dot_product_attention(
        q_bthd, k_bshd, v_bshd, mask=mask, scale=scale, implementation="xla"
    )


class MultiHeadAttention(nnx.Module):
    """Multi-head attention; self-attention when `context_bsd` is None, cross-attention otherwise.

    With `positions="rope"`, self-attention rotates queries and keys by their positions; cross-attention
    does not (its keys live in another sequence). With `capture_weights` set (and the reference
    implementation), the attention weights are sown as `nnx.Intermediate` for inspection.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.query, self.key, self.value = (
            dense(cfg, cfg.d_model, cfg.d_model, rngs=rngs, names=("embed", "heads"))
            for _ in range(3)
        )
        self.out = dense(cfg, cfg.d_model, cfg.d_model, rngs=rngs, names=("heads", "embed"))
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.implementation = cfg.attention
        self.rope_theta = cfg.rope_theta if cfg.positions == "rope" else None
        self.capture_weights = False

    def _heads(self, x_btd: jax.Array) -> jax.Array:
        x_bthd = x_btd.reshape(*x_btd.shape[:-1], self.n_heads, self.head_dim)
        return constrain(x_bthd, ("act_batch", "act_length", "act_heads", None))

    def _rotate(self, x_bthd: jax.Array, positions_bt: jax.Array | None) -> jax.Array:
        """Rope on self-attention (positions given); cross-attention passes no positions."""
        if self.rope_theta is None or positions_bt is None:
            return x_bthd
        return apply_rope(x_bthd, positions_bt, self.rope_theta)

    def _keys_values(self, context_bsd: jax.Array, positions_bs: jax.Array | None = None):
        """Keys and values (B, S, heads, head_dim) of `context_bsd`; keys rotated for self-attention."""
        k_bshd = self._rotate(self._heads(self.key(context_bsd)), positions_bs)
        return k_bshd, self._heads(self.value(context_bsd))

    def memory_cache(self, memory_bsd: jax.Array) -> KVCache:
        """Cross-attention keys/values of an encoder memory, computed once for decoding."""
        return KVCache(*map(to_head_major, self._keys_values(memory_bsd)))

    def __call__(
        self, x_btd: jax.Array, context_bsd: jax.Array | None = None, *,
        mask: jax.Array | None = None, positions_bt: jax.Array | None = None,
    ) -> jax.Array:
        is_self = context_bsd is None
        positions_bt = positions_bt if is_self else None
        q_bthd = self._rotate(self._heads(self.query(x_btd)), positions_bt)
        k_bshd, v_bshd = self._keys_values(x_btd if is_self else context_bsd, positions_bt)
        if self.capture_weights:
            out_bthd, weights_bhts = reference_attention(q_bthd, k_bshd, v_bshd, mask)
            self.sow(nnx.Intermediate, "attention_weights", weights_bhts)
        else:
            out_bthd = dot_product_attention(
                q_bthd, k_bshd, v_bshd, mask=mask, implementation=self.implementation
            )
        return self.out(out_bthd.reshape(x_btd.shape))

    def cached(
        self, x_btd: jax.Array, cache: KVCache, *, mask: jax.Array,
        positions_bt: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Attention over a KV cache; returns (output, cache).

        Self-attention (`positions_bt` given): this call's keys/values are first written at their
        positions, then the queries attend over the whole cache under `mask` (see `cache_mask`).
        Cross-attention (no positions): the cache holds the memory's keys/values, read only.
        """
        q_bhtd = to_head_major(self._rotate(self._heads(self.query(x_btd)), positions_bt))
        if positions_bt is not None:
            k_bthd, v_bthd = self._keys_values(x_btd, positions_bt)
            cache = cache.write(to_head_major(k_bthd), to_head_major(v_bthd), positions_bt[:, 0])
        out_bhtd = head_major_attention(q_bhtd, cache.k, cache.v, mask)[0]
        return self.out(to_head_major(out_bhtd).reshape(x_btd.shape)), cache
