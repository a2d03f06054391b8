"""Multi-head attention, one path: masks, the one attention function (auto | xla | cudnn |
reference), and the KV cache decoding reads and writes.

Queries, keys, values and the cache are head-major, (B, heads, T, head_dim); keys, values and the
cache hold only the n_kv_heads of grouped-query attention. Head-major, the cache's batched
matmuls then need no transposes (a (B, T, heads, head_dim) cache is copied at every decoding step,
~10x slower on CPU), and the xla path's swaps to jax.nn.dot_product_attention's layout and back
cancel out in XLA. Masks are boolean and broadcast to (batch, heads, queries, keys); True means
"may attend".
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.instrument import SowConfig
from jaxformer.models.layers import apply_rope, dense, norm_layer, softcap
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
    """Keys and values (B, kv_heads, W, head_dim) of one attention layer; slot w holds position w."""

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


def attention_weights(q_bhtd: jax.Array, k_bksd: jax.Array, mask: jax.Array | None = None,
                      scale: float | None = None, cap: float | None = None) -> jax.Array:
    """softmax(Q K^T * scale) over the keys, (B, heads, T, S); scale 1/sqrt(head_dim) by default.

    Grouped-query attention: the H query heads form K groups of H/K, group k reading kv head k
    (the keys are never repeated in memory). `cap`: Gemma 2's soft cap on the scores."""
    batch, n_heads, length, head_dim = q_bhtd.shape
    n_kv_heads = k_bksd.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    q_bkgtd = q_bhtd.reshape(batch, n_kv_heads, n_heads // n_kv_heads, length, head_dim)
    scores_bkgts = softcap(jnp.einsum("bkgtd,bksd->bkgts", q_bkgtd, k_bksd) * scale, cap)
    scores_bhts = scores_bkgts.reshape(batch, n_heads, length, -1)
    if mask is not None:
        scores_bhts = jnp.where(mask, scores_bhts, jnp.finfo(scores_bhts.dtype).min)
    return jax.nn.softmax(scores_bhts.astype(jnp.float32), axis=-1).astype(q_bhtd.dtype)


def dot_product_attention(
    q_bhtd: jax.Array, k_bksd: jax.Array, v_bksd: jax.Array, mask: jax.Array | None = None,
    implementation: str = "auto", scale: float | None = None, cap: float | None = None,
) -> jax.Array:
    """The attention function of training, decoding and inspection: (B, heads, T, head_dim), with
    K <= H kv heads. auto | xla | cudnn: jax.nn.dot_product_attention (auto lets JAX choose: cuDNN's
    fused kernel on a GPU where it applies, XLA otherwise); reference: softmax(Q K^T / sqrt(d)) V
    spelled out, which also serves a soft cap (jax.nn.dot_product_attention has none)."""
    implementation = resolve_implementation(implementation, q_bhtd, cap)
    if implementation != "reference":
        out_bthd = jax.nn.dot_product_attention(
            *map(to_head_major, (q_bhtd, k_bksd, v_bksd)), mask=mask, scale=scale,
            implementation=implementation)
        return to_head_major(out_bthd)
    weights_bhts = attention_weights(q_bhtd, k_bksd, mask, scale, cap)
    batch, n_heads, length, _ = q_bhtd.shape
    n_kv_heads = k_bksd.shape[1]
    weights_bkgts = weights_bhts.reshape(batch, n_kv_heads, n_heads // n_kv_heads, length, -1)
    out_bkgtd = jnp.einsum("bkgts,bksd->bkgtd", weights_bkgts, v_bksd)
    return out_bkgtd.reshape(q_bhtd.shape)


CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128  # 256 on Hopper and later; 128 holds everywhere


def resolve_implementation(requested: str, q_bhtd: jax.Array, cap: float | None) -> str:
    """The attention path a call takes. auto: cuDNN's fused kernel on a GPU where it applies
    (half-precision inputs, head dim a multiple of 8 up to 128, no soft cap), else XLA (JAX's own
    `implementation=None` means XLA for now); a soft cap always takes the reference path."""
    if cap is not None:
        return "reference"
    if requested != "auto":
        return requested
    head_dim = q_bhtd.shape[-1]
    if (jax.default_backend() == "gpu" and q_bhtd.dtype in CUDNN_DTYPES
            and head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM):
        return "cudnn"
    return "xla"


class MultiHeadAttention(nnx.Module):
    """Self-attention over `x_btd`, or (`cross=True`) cross-attention to a context sequence.

    n_heads query heads read n_kv_heads key/value heads (grouped-query; multi-query at 1), each of
    head_dim channels; with qk_norm each head's queries and keys pass an RMSNorm first (OLMo 2,
    Qwen3). Rope (`positions="rope"`) then rotates the queries and keys of self-attention by their
    positions; cross-attention gets no positions (its keys live in another sequence). With
    `sow_config` (models/instrument.py) the attention weights can be sown beside the output.
    """

    def __init__(self, cfg: ModelConfig, *, cross: bool = False, rngs: nnx.Rngs):
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_size
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        kv_units = {"kv_heads": self.n_kv_heads}
        self.query = dense(cfg, cfg.d_model, q_width, rngs=rngs, names=("embed", "heads"))
        self.key, self.value = (
            dense(cfg, cfg.d_model, kv_width, rngs=rngs, names=("embed", "kv_heads"),
                  units=kv_units)
            for _ in range(2)
        )
        self.out = dense(cfg, q_width, cfg.d_model, rngs=rngs, names=("heads", "embed"))
        self.query_norm, self.key_norm = (
            (norm_layer(qk_norm_cfg(cfg), self.head_dim, "head_dim", rngs=rngs) for _ in range(2))
            if cfg.qk_norm else (None, None)
        )
        self.implementation = cfg.attention
        self.cap = cfg.attn_logit_softcap
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
        q_bhtd = self._heads(self.query(x_btd), self.n_heads, self.query_norm, positions_bt)
        if self.cross and cache is not None:  # the memory's keys/values, computed once
            k_bksd, v_bksd = cache
        else:
            k_bksd, v_bksd = self._keys_values(x_btd if context_bsd is None else context_bsd,
                                               positions_bt)
            if cache is not None:  # this call's positions join the ones decoded before
                cache = cache.write(k_bksd, v_bksd, positions_bt[:, 0])
                k_bksd, v_bksd = cache
        out_bhtd = dot_product_attention(q_bhtd, k_bksd, v_bksd, mask, self.implementation,
                                         cap=self.cap)
        self.sow_config.maybe_sow_attention_weights(
            self, lambda: attention_weights(q_bhtd, k_bksd, mask, cap=self.cap))
        out_btd = to_head_major(out_bhtd).reshape(*x_btd.shape[:-1], -1)
        return self.out(out_btd), cache

    def _heads(self, x_btd: jax.Array, n_heads: int, norm: nnx.Module | None,
               positions_bt: jax.Array | None = None) -> jax.Array:
        """(B, T, n_heads * head_dim) -> (B, n_heads, T, head_dim): normed per head (qk_norm),
        rotated by `positions_bt` under rope."""
        x_bthd = x_btd.reshape(*x_btd.shape[:-1], n_heads, self.head_dim)
        heads_name = "act_heads" if n_heads == self.n_heads else "act_kv_heads"
        x_bthd = constrain(x_bthd, ("act_batch", "act_length", heads_name, None))
        if norm is not None:
            x_bthd = norm(x_bthd)
        if self.rope_theta is not None and positions_bt is not None and not self.cross:
            x_bthd = apply_rope(x_bthd, positions_bt, self.rope_theta)
        return to_head_major(x_bthd)

    def _keys_values(self, context_bsd: jax.Array, positions_bs: jax.Array | None = None):
        return (self._heads(self.key(context_bsd), self.n_kv_heads, self.key_norm, positions_bs),
                self._heads(self.value(context_bsd), self.n_kv_heads, None))

    def memory_cache(self, memory_bsd: jax.Array) -> KVCache:
        """Cross-attention keys/values of an encoder memory, computed once for decoding."""
        return KVCache(*self._keys_values(memory_bsd))


def qk_norm_cfg(cfg: ModelConfig) -> ModelConfig:
    """QK-norm is an RMSNorm whatever model.norm_type says (OLMo 2, Qwen3, Gemma 3)."""
    return dataclasses.replace(cfg, norm_type="rmsnorm")
