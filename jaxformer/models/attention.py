"""Scaled dot-product attention and multi-head attention with causal and padding masks.

Masks are boolean and broadcast to (batch, heads, queries, keys); True means "may attend".
"""

from __future__ import annotations

import math

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


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = jnp.logical_and(out, m)
    return out


def reference_attention(
    q_bthd: jax.Array, k_bshd: jax.Array, v_bshd: jax.Array,
    mask: jax.Array | None = None, scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """softmax(Q K^T * scale) V spelled out; returns (output_bthd, weights_bhts)."""
    scale = 1.0 / math.sqrt(q_bthd.shape[-1]) if scale is None else scale
    scores_bhts = jnp.einsum("bthd,bshd->bhts", q_bthd, k_bshd) * scale
    if mask is not None:
        scores_bhts = jnp.where(mask, scores_bhts, jnp.finfo(scores_bhts.dtype).min)
    weights_bhts = jax.nn.softmax(scores_bhts.astype(jnp.float32), axis=-1).astype(v_bshd.dtype)
    return jnp.einsum("bhts,bshd->bthd", weights_bhts, v_bshd), weights_bhts


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

    def __call__(
        self, x_btd: jax.Array, context_bsd: jax.Array | None = None, *,
        mask: jax.Array | None = None, positions_bt: jax.Array | None = None,
    ) -> jax.Array:
        is_self = context_bsd is None
        context_bsd = x_btd if is_self else context_bsd
        q_bthd = self._heads(self.query(x_btd))
        k_bshd = self._heads(self.key(context_bsd))
        v_bshd = self._heads(self.value(context_bsd))
        if self.rope_theta is not None and is_self:
            q_bthd = apply_rope(q_bthd, positions_bt, self.rope_theta)
            k_bshd = apply_rope(k_bshd, positions_bt, self.rope_theta)
        if self.capture_weights:
            out_bthd, weights_bhts = reference_attention(q_bthd, k_bshd, v_bshd, mask)
            self.sow(nnx.Intermediate, "attention_weights", weights_bhts)
        else:
            out_bthd = dot_product_attention(
                q_bthd, k_bshd, v_bshd, mask=mask, implementation=self.implementation
            )
        return self.out(out_bthd.reshape(x_btd.shape))
