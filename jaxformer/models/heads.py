"""Sequence-classification heads shared by the encoder (cls / mean pooling) and the decoder
(last token: the only position a causal model computes from the whole sequence)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.layers import dense


def mean_pool(x_btd: jax.Array, valid_bt: jax.Array | None) -> jax.Array:
    """(B, d): the mean of the valid (non-padding) positions."""
    weights_bt = (jnp.ones(x_btd.shape[:2]) if valid_bt is None else valid_bt).astype(x_btd.dtype)
    return jnp.einsum("btd,bt->bd", x_btd, weights_bt) / jnp.maximum(
        weights_bt.sum(axis=1, keepdims=True), 1.0
    )


def last_token(x_btd: jax.Array, valid_bt: jax.Array | None) -> jax.Array:
    """(B, d): each row's last valid position (right padding), or the last position."""
    if valid_bt is None:
        return x_btd[:, -1]
    last_b = jnp.maximum(valid_bt.astype(jnp.int32).sum(axis=1) - 1, 0)
    return jnp.take_along_axis(x_btd, last_b[:, None, None], axis=1)[:, 0]


class ClassificationHead(nnx.Module):
    """Pools the sequence (cls: first token through a tanh dense 'pooler', as BERT; mean: the mean
    of the valid positions; last: the last valid position), then dropout and a linear layer to
    `num_classes` logits."""

    def __init__(self, cfg: ModelConfig, *, pooling: str | None = None, rngs: nnx.Rngs):
        self.pooling = pooling or cfg.pooling
        self.pooler = (dense(cfg, cfg.d_model, cfg.d_model, rngs=rngs, bias=True)
                       if self.pooling == "cls" else None)
        self.dropout = nnx.Dropout(cfg.dropout)
        self.out = dense(cfg, cfg.d_model, cfg.num_classes, rngs=rngs, bias=True,
                         names=("embed", "classes"))

    def __call__(self, x_btd: jax.Array, valid_bt: jax.Array | None, **dropout_kw) -> jax.Array:
        if self.pooling == "cls":
            pooled_bd = jnp.tanh(self.pooler(x_btd[:, 0]))
        elif self.pooling == "last":
            pooled_bd = last_token(x_btd, valid_bt)
        else:
            pooled_bd = mean_pool(x_btd, valid_bt)
        return self.out(self.dropout(pooled_bd, **dropout_kw)).astype(jnp.float32)


class Classifies:
    """`classify` for a model holding an optional `classifier` (built when model.num_classes > 0)."""

    classifier: ClassificationHead | None

    def classify(
        self, hidden_btd: jax.Array, valid_bt: jax.Array | None = None, *,
        deterministic: bool = True, rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Class logits (B, num_classes), float32, from final hidden states."""
        if self.classifier is None:
            raise ValueError(f"this {type(self).__name__.lower()} has no classification head: set "
                             "model.num_classes > 0")
        return self.classifier(hidden_btd, valid_bt, deterministic=deterministic, rngs=rngs)
