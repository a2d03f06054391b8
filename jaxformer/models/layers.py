"""Building blocks shared by every model family: embeddings, MLP, norms, positions, initialisers."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.config import ModelConfig

ACTIVATION_FNS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "sigmoid": jax.nn.sigmoid,
    "silu": jax.nn.silu,
}

EMBED_INIT = nnx.initializers.normal(stddev=0.02)


def dense_init(cfg: ModelConfig) -> nnx.Initializer:
    return {
        "normal": nnx.initializers.normal(stddev=0.02),
        "xavier": nnx.initializers.xavier_uniform(),
        "he": nnx.initializers.he_normal(),
    }[cfg.init]


def dtypes(cfg: ModelConfig) -> dict:
    return {"dtype": jnp.dtype(cfg.dtype), "param_dtype": jnp.dtype(cfg.param_dtype)}


class Embed(nnx.Module):
    """Token embedding; `attend` reuses the table as the output projection (tied weights)."""

    def __init__(self, vocab_size: int, d_model: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.embedding = nnx.Param(
            EMBED_INIT(rngs.params(), (vocab_size, d_model), jnp.dtype(cfg.param_dtype))
        )
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, tokens_bt: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...].astype(self.dtype), tokens_bt, axis=0)

    def attend(self, x_btd: jax.Array) -> jax.Array:
        return x_btd @ self.embedding[...].astype(self.dtype).T


class MLP(nnx.Module):
    """Position-wise feed-forward: d_model -> d_ff -> activation -> d_model."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        init = dense_init(cfg)
        self.up = nnx.Linear(cfg.d_model, cfg.d_ff, kernel_init=init, rngs=rngs, **dtypes(cfg))
        self.down = nnx.Linear(cfg.d_ff, cfg.d_model, kernel_init=init, rngs=rngs, **dtypes(cfg))
        self.activation = ACTIVATION_FNS[cfg.activation]

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        return self.down(self.activation(self.up(x_btd)))


def make_norm(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module | None:
    if cfg.norm == "none":
        return None
    return nnx.LayerNorm(cfg.d_model, epsilon=cfg.layer_norm_eps, rngs=rngs, **dtypes(cfg))


def sinusoidal_table(max_len: int, d_model: int) -> np.ndarray:
    """The fixed table of Vaswani et al. 2017: sin on even, cos on odd channels."""
    position = np.arange(max_len)[:, None]
    inv_freq = np.exp(-np.log(10000.0) * np.arange(0, d_model, 2) / d_model)
    table = np.zeros((max_len, d_model), np.float32)
    table[:, 0::2] = np.sin(position * inv_freq)
    table[:, 1::2] = np.cos(position * inv_freq)[:, : d_model // 2]
    return table


class SinusoidalPositions(nnx.Module):
    def __init__(self, cfg: ModelConfig):
        self.max_len, self.d_model = cfg.max_len, cfg.d_model

    def __call__(self, positions_bt: jax.Array) -> jax.Array:
        # built from numpy at trace time: a compile-time constant, never a parameter or checkpointed
        table = jnp.asarray(sinusoidal_table(self.max_len, self.d_model))
        return jnp.take(table, positions_bt, axis=0)


class LearnedPositions(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.embedding = nnx.Param(
            EMBED_INIT(rngs.params(), (cfg.max_len, cfg.d_model), jnp.dtype(cfg.param_dtype))
        )

    def __call__(self, positions_bt: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], positions_bt, axis=0)


def make_positions(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    if cfg.positions == "learned":
        return LearnedPositions(cfg, rngs=rngs)
    return SinusoidalPositions(cfg)


def check_length(length: int, max_len: int) -> None:
    if length > max_len:
        raise ValueError(
            f"sequence length {length} exceeds model.max_len={max_len}: "
            "raise model.max_len or shorten the inputs"
        )
