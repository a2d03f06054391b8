"""Transformer blocks with norm-placement and residual switches, and the layer stack."""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.attention import MultiHeadAttention
from jaxformer.models.layers import MLP, make_norm


class Sublayer(nnx.Module):
    """One residual branch: norm placement (pre | post | none), dropout, optional residual."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.norm = make_norm(cfg, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout)
        self.placement = cfg.norm
        self.residual = cfg.residual

    def __call__(self, x_btd: jax.Array, fn: Callable[[jax.Array], jax.Array], **dropout_kw):
        h_btd = self.norm(x_btd) if self.placement == "pre" else x_btd
        h_btd = self.dropout(fn(h_btd), **dropout_kw)
        if self.residual:
            h_btd = x_btd + h_btd
        return self.norm(h_btd) if self.placement == "post" else h_btd


class DecoderBlock(nnx.Module):
    """Self-attention (causal mask passed in) then MLP, each wrapped in a Sublayer."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attention = MultiHeadAttention(cfg, rngs=rngs)
        self.attention_branch = Sublayer(cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)
        self.mlp_branch = Sublayer(cfg, rngs=rngs)

    def __call__(self, x_btd: jax.Array, mask: jax.Array | None, **dropout_kw) -> jax.Array:
        x_btd = self.attention_branch(x_btd, lambda h: self.attention(h, mask=mask), **dropout_kw)
        return self.mlp_branch(x_btd, self.mlp, **dropout_kw)
