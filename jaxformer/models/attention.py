"""Multi-head attention, one path: masks, the one attention function (xla | reference), and the
KV cache decoding reads and writes.

Queries, keys, values and the cache are head-major, (B, heads, T, head_dim): the cache's batched
matmuls then need no transposes (a (B, T, heads, head_dim) cache is copied at every decoding step,
~10x slower on CPU), and the xla path's swaps to jax.nn.dot_product_attention's layout and back
cancel out in XLA. Masks are boolean and broadcast to (batch, heads, queries, keys); True means
"may attend".
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.instrument import SowConfig
from jaxformer.models.layers import apply_rope, dense
from jaxformer.parallel import constrain


def causal_mask(length: int) -> jax.Array:
    """(1, 1, T, T): query t sees keys 0..t."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def padding_mask(valid_bs: jax.Array) -> jax.Array:
    """(B, 1, 1, S): keys that are real tokens (not padding)."""
    return valid_bs.astype(bool)[:, None, None, :]


def segment_mask(segment_ids_bt: jax.Array) -> jax.Array:
    """(B, 1, T, T): a query sees keys of its own segment only (documents packed in one row)."""
    return (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])[:, None]


def cache_mask(positions_bt: jax.Array, width: int) -> jax.Array:
    """(B, 1, T, W): a query at absolute position p sees cache slots 0..p (slot = position)."""
    return (jnp.arange(width) <= positions_bt[:, :, None])[:, None]


class KVCache(NamedTuple):
    """Keys and values (B, heads, W, head_dim) of one attention layer; slot w holds position w."""

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


def to_head_major(x_bthd: jax.Array) -> jax.Array:
    """(B, T, H, D) <-> (B, H, T, D)."""
    return jnp.swapaxes(x_bthd, 1, 2)


def attention_weights(q_bhtd: jax.Array, k_bhsd: jax.Array, mask: jax.Array | None = None,
                      scale: float | None = None) -> jax.Array:
    """softmax(Q K^T * scale) over the keys, (B, heads, T, S); scale 1/sqrt(head_dim) by default."""
    scale = 1.0 / math.sqrt(q_bhtd.shape[-1]) if scale is None else scale
    scores_bhts = jnp.einsum("bhtd,bhsd->bhts", q_bhtd, k_bhsd) * scale
    if mask is not None:
        scores_bhts = jnp.where(mask, scores_bhts, jnp.finfo(scores_bhts.dtype).min)
    return jax.nn.softmax(scores_bhts.astype(jnp.float32), axis=-1).astype(q_bhtd.dtype)


def dot_product_attention(
    q_bhtd: jax.Array, k_bhsd: jax.Array, v_bhsd: jax.Array, mask: jax.Array | None = None,
    implementation: str = "xla", scale: float | None = None,
) -> jax.Array:
    """The attention function of training, decoding and inspection: (B, heads, T, head_dim).
    xla: jax.nn.dot_product_attention's XLA path; reference: softmax(Q K^T / sqrt(d)) V spelled out."""
    if implementation == "xla":
        out_bthd = jax.nn.dot_product_attention(
            *map(to_head_major, (q_bhtd, k_bhsd, v_bhsd)), mask=mask, scale=scale,
            implementation="xla")
        return to_head_major(out_bthd)
    return jnp.einsum("bhts,bhsd->bhtd", attention_weights(q_bhtd, k_bhsd, mask, scale), v_bhsd)


class MultiHeadAttention(nnx.Module):
    """Self-attention over `x_btd`, or (`cross=True`) cross-attention to a context sequence.

    Rope (`positions="rope"`) rotates the queries and keys of self-attention by their positions;
    cross-attention gets no positions (its keys live in another sequence). With `sow_config`
    (models/instrument.py) the attention weights can be sown beside the unchanged output.
    """

    def __init__(self, cfg: ModelConfig, *, cross: bool = False, rngs: nnx.Rngs):
        self.query, self.key, self.value = (
            dense(cfg, cfg.d_model, cfg.d_model, rngs=rngs, names=("embed", "heads"))
            for _ in range(3)
        )
        self.out = dense(cfg, cfg.d_model, cfg.d_model, rngs=rngs, names=("heads", "embed"))
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.implementation = cfg.attention
        self.rope_theta = cfg.rope_theta if cfg.positions == "rope" else None
        self.cross = cross
        self.sow_config = SowConfig()

    def __call__(
        self, x_btd: jax.Array, context_bsd: jax.Array | None = None, *, mask: jax.Array | None,
        positions_bt: jax.Array | None = None, cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """(output (B, T, d_model), cache); the cache is None when none was given.

        Decoding: self-attention writes this call's keys/values into `cache` at `positions_bt`,
        then attends over the whole cache (`mask` from `cache_mask`); cross-attention reads the
        context's keys/values from `cache` (`memory_cache`) and takes no context."""
        q_bhtd = self._heads(self.query(x_btd), positions_bt)
        if self.cross and cache is not None:  # the memory's keys/values, computed once
            k_bhsd, v_bhsd = cache
        else:
            k_bhsd, v_bhsd = self._keys_values(x_btd if context_bsd is None else context_bsd,
                                               positions_bt)
            if cache is not None:  # this call's positions join the ones decoded before
                cache = cache.write(k_bhsd, v_bhsd, positions_bt[:, 0])
                k_bhsd, v_bhsd = cache
        out_bhtd = dot_product_attention(q_bhtd, k_bhsd, v_bhsd, mask, self.implementation)
        self.sow_config.maybe_sow_attention_weights(
            self, lambda: attention_weights(q_bhtd, k_bhsd, mask))
        return self.out(to_head_major(out_bhtd).reshape(x_btd.shape)), cache

    def _heads(self, x_btd: jax.Array, positions_bt: jax.Array | None = None) -> jax.Array:
        """(B, T, d_model) -> (B, heads, T, head_dim), rotated by `positions_bt` under rope."""
        x_bthd = x_btd.reshape(*x_btd.shape[:-1], self.n_heads, self.head_dim)
        x_bthd = constrain(x_bthd, ("act_batch", "act_length", "act_heads", None))
        if self.rope_theta is not None and positions_bt is not None and not self.cross:
            x_bthd = apply_rope(x_bthd, positions_bt, self.rope_theta)
        return to_head_major(x_bthd)

    def _keys_values(self, context_bsd: jax.Array, positions_bs: jax.Array | None = None):
        return self._heads(self.key(context_bsd), positions_bs), self._heads(self.value(context_bsd))

    def memory_cache(self, memory_bsd: jax.Array) -> KVCache:
        """Cross-attention keys/values of an encoder memory, computed once for decoding."""
        return KVCache(*self._keys_values(memory_bsd))
