"""Building blocks shared by every model family: embeddings, MLP, norms, positions, initialisers."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.instrument import SowConfig
from jaxformer.parallel import constrain

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


def axes(*names: str) -> dict:
    """Variable metadata naming a parameter's logical axes (mapped to mesh axes by
    jaxformer.parallel.LOGICAL_RULES). Placement happens where the train state is created under
    jit with explicit shardings, never eagerly when a module is built."""
    return {"out_sharding": names, "eager_sharding": False}


def dense(cfg: ModelConfig, d_in: int, d_out: int, *, rngs: nnx.Rngs, bias: bool | None = None,
          names: tuple[str, str] = ("embed", "features")):
    """A Linear layer with the model's initialiser, dtypes and bias switch; `names` are the
    kernel's logical axes (in, out)."""
    return nnx.Linear(d_in, d_out, use_bias=cfg.bias if bias is None else bias,
                      kernel_init=dense_init(cfg), rngs=rngs, kernel_metadata=axes(*names),
                      bias_metadata=axes(names[1]), **dtypes(cfg))


class Embed(nnx.Module):
    """Token embedding; `attend` reuses the table as the output projection (tied weights)."""

    def __init__(self, vocab_size: int, d_model: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.embedding = nnx.Param(
            EMBED_INIT(rngs.params(), (vocab_size, d_model), jnp.dtype(cfg.param_dtype)),
            **axes("vocab", "embed"),
        )
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, tokens_bt: jax.Array) -> jax.Array:
        # gathered whole before the lookup (as FSDP gathers every weight before use): a row
        # lookup into a vocab- or embed-sharded table has no efficient partitioned form
        table_vd = constrain(self.embedding[...].astype(self.dtype), (None, None))
        return jnp.take(table_vd, tokens_bt, axis=0)

    def attend(self, x_btd: jax.Array) -> jax.Array:
        logits_btv = x_btd @ self.embedding[...].astype(self.dtype).T
        return constrain(logits_btv, ("act_batch", "act_length", "act_vocab"))


class MLP(nnx.Module):
    """Position-wise feed-forward: d_model -> d_ff -> activation -> d_model."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.up = dense(cfg, cfg.d_model, cfg.d_ff, rngs=rngs, names=("embed", "mlp"))
        self.down = dense(cfg, cfg.d_ff, cfg.d_model, rngs=rngs, names=("mlp", "embed"))
        self.activation = ACTIVATION_FNS[cfg.activation]
        self.activation_name = cfg.activation
        self.sow_config = SowConfig()  # models/instrument.py

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        pre_btf = constrain(self.up(x_btd), ("act_batch", "act_length", "act_mlp"))
        hidden_btf = self.activation(pre_btf)
        self.sow_config.maybe_sow_activation_stats(self, pre_btf, hidden_btf)
        return self.down(hidden_btf)


def make_norm(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module | None:
    if cfg.norm == "none":
        return None
    return layer_norm(cfg, rngs=rngs)


def layer_norm(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(cfg.d_model, epsilon=cfg.layer_norm_eps, rngs=rngs,
                         scale_metadata=axes("embed"), bias_metadata=axes("embed"), **dtypes(cfg))


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
            EMBED_INIT(rngs.params(), (cfg.max_len, cfg.d_model), jnp.dtype(cfg.param_dtype)),
            **axes("positions", "embed"),
        )

    def __call__(self, positions_bt: jax.Array) -> jax.Array:
        return jnp.take(constrain(self.embedding[...], (None, None)), positions_bt, axis=0)


def make_positions(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module | None:
    """Absolute positions added to the embeddings; None for rope (applied inside attention)."""
    if cfg.positions == "learned":
        return LearnedPositions(cfg, rngs=rngs)
    if cfg.positions == "sinusoidal":
        return SinusoidalPositions(cfg)
    return None


def apply_rope(x_bthd: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding (Su et al. 2021), rotate-half layout (GPT-NeoX, LLaMA): channel i pairs
    with i + D/2 and turns by positions * theta^(-2i/D), so q.k depends on relative position only."""
    half = x_bthd.shape[-1] // 2
    inv_freq_h = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_bth = positions_bt[..., None].astype(jnp.float32) * inv_freq_h
    cos, sin = jnp.cos(angles_bth)[:, :, None, :], jnp.sin(angles_bth)[:, :, None, :]
    x1, x2 = x_bthd[..., :half].astype(jnp.float32), x_bthd[..., half:].astype(jnp.float32)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_bthd.dtype)


class Embeddings(nnx.Module):
    """What joins the token vectors before the first block: absolute positions (learned or
    sinusoidal; none for rope), token types (BERT segments), an optional LayerNorm, dropout."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.positions = make_positions(cfg, rngs=rngs)
        self.token_types = (
            nnx.Param(EMBED_INIT(rngs.params(), (cfg.type_vocab_size, cfg.d_model),
                                 jnp.dtype(cfg.param_dtype)), **axes("types", "embed"))
            if cfg.type_vocab_size else None
        )
        self.norm = layer_norm(cfg, rngs=rngs) if cfg.embed_norm else None
        self.dropout = nnx.Dropout(cfg.dropout)
        self.max_len = cfg.max_len

    def __call__(
        self, x_btd: jax.Array, positions_bt: jax.Array, token_types_bt: jax.Array | None = None,
        **dropout_kw,
    ) -> jax.Array:
        check_length(positions_bt.shape[-1], self.max_len)
        if self.positions is not None:
            x_btd = x_btd + self.positions(positions_bt).astype(x_btd.dtype)
        if self.token_types is not None:
            types_bt = jnp.zeros_like(positions_bt) if token_types_bt is None else token_types_bt
            table_sd = constrain(self.token_types[...], (None, None))
            x_btd = x_btd + jnp.take(table_sd, types_bt, axis=0).astype(x_btd.dtype)
        if self.norm is not None:
            x_btd = self.norm(x_btd)
        x_btd = constrain(x_btd, ("act_batch", "act_length", "act_embed"))
        return self.dropout(x_btd, **dropout_kw)


def check_length(length: int, max_len: int) -> None:
    if length > max_len:
        raise ValueError(
            f"sequence length {length} exceeds model.max_len={max_len}: "
            "raise model.max_len or shorten the inputs"
        )


def positions_like(tokens_bt: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
