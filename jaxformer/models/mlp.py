"""A plain deep MLP classifier (the classic vanishing-gradient setting: no residual, no norm).

features (B, input_dim) -> linear input projection to d_model -> n_layers x [dense d_model ->
d_model, activation] -> linear head to num_classes logits. Depth counts the hidden dense+activation
layers; they live in a LayerStack (stacked parameters, scanned or unrolled), so the same per-layer
diagnostics serve this model and the transformers. Activation, init and bias follow model.*.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.blocks import LayerStack
from jaxformer.models.layers import ACTIVATION_FNS, dense
from jaxformer.models.instrument import SowConfig


class DenseLayer(nnx.Module):
    """One hidden layer: dense, activation, dropout."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.dense = dense(cfg, cfg.d_model, cfg.d_model, rngs=rngs)
        self.activation = ACTIVATION_FNS[cfg.activation]
        self.activation_name = cfg.activation
        self.dropout = nnx.Dropout(cfg.dropout)
        self.sow_config = SowConfig()  # models/instrument.py

    def __call__(self, x_bd: jax.Array, **dropout_kw) -> jax.Array:
        pre_bd = self.dense(x_bd)
        h_bd = self.activation(pre_bd)
        self.sow_config.maybe_sow_activation_stats(self, pre_bd, h_bd)
        return self.dropout(h_bd, **dropout_kw)


def require_sizes(cfg: ModelConfig) -> tuple[int, int]:
    if cfg.input_dim is None or cfg.num_classes < 2:
        raise ValueError("model.input_dim or model.num_classes is unset: build the mlp through "
                         "models.build_model with a vector task")
    return cfg.input_dim, cfg.num_classes


class MLPClassifier(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        input_dim, num_classes = require_sizes(cfg)
        self.input = dense(cfg, input_dim, cfg.d_model, rngs=rngs)
        self.stack = LayerStack(cfg, cfg.n_layers, layer=DenseLayer, rngs=rngs)
        self.head = dense(cfg, cfg.d_model, num_classes, rngs=rngs)

    def __call__(self, features_bf: jax.Array, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        """Class logits (B, num_classes), float32."""
        h_bd = self.stack(self.input(features_bf), deterministic=deterministic, rngs=rngs)
        return self.head(h_bd).astype(jnp.float32)
