"""Building blocks shared by every model family: embeddings, output head, MLP (dense or gated),
norms (LayerNorm or RMSNorm), positions, initialisers."""

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


def axes(*names: str, units: dict[str, int] | None = None) -> dict:
    """Variable metadata naming a parameter's logical axes (mapped to mesh axes by
    jaxformer.parallel.LOGICAL_RULES) and, in `units`, how many indivisible pieces an axis holds
    (heads). Placement happens where the train state is created under jit with explicit
    shardings, never eagerly when a module is built."""
    # a tuple of pairs: metadata lives in the (hashed) graphdef
    return {"out_sharding": names, "eager_sharding": False,
            **({"shard_units": tuple(units.items())} if units else {})}


@jax.custom_vjp
def _dense_matmul(x_tk: jax.Array, kernel_kn: jax.Array) -> jax.Array:
    return jnp.einsum("...k,kn->...n", x_tk, kernel_kn)


def _dense_matmul_fwd(x_tk, kernel_kn):
    return _dense_matmul(x_tk, kernel_kn), (x_tk, kernel_kn)


def _dense_matmul_bwd(residuals, dy_tn):
    """The kernel gradient contracts over the tokens. XLA:CPU hands the right-hand side of a
    dot to XNNPACK as (N, K), so x^T dy materialises dy transposed, fused into the activation's
    backward with strided reads (~35 ms a layer for a Llama-style SwiGLU at bench-small);
    (dy^T x)^T transposes x instead. Each layer takes whichever of the two is narrower."""
    x_tk, kernel_kn = residuals
    dx_tk = jnp.einsum("...n,kn->...k", dy_tn, kernel_kn)
    x_2d, dy_2d = x_tk.reshape(-1, x_tk.shape[-1]), dy_tn.reshape(-1, dy_tn.shape[-1])
    if x_2d.shape[1] <= dy_2d.shape[1]:
        dkernel_kn = jnp.einsum("kt,tn->kn", x_2d.T, dy_2d)
    else:
        dkernel_kn = jnp.einsum("nt,tk->kn", dy_2d.T, x_2d)
    return dx_tk, dkernel_kn.astype(kernel_kn.dtype)


_dense_matmul.defvjp(_dense_matmul_fwd, _dense_matmul_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, **kwargs):
    """nnx.Linear's dot: on CPU the matmul above (same forward, the kernel gradient's transpose
    on the narrower operand: docs/performance.md), elsewhere lax.dot_general (GPU and TPU
    matmuls read transposed operands in place)."""
    linear = dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())) and rhs.ndim == 2
    if (not linear or jax.default_backend() != "cpu" or precision is not None
            or kwargs.get("out_sharding") is not None):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, **kwargs)
    return _dense_matmul(lhs, rhs).astype(kwargs.get("preferred_element_type") or lhs.dtype)


def project(x_btk: jax.Array, kernel_kn: jax.Array) -> jax.Array:
    """`x @ kernel` as the dense layers compute it: the untied output layer's d x V kernel
    gradient then transposes the hidden states on CPU, not the (tokens, vocab) d(logits): Llama
    +3-11% tokens/s in 5 of 5 runs side by side. The tied head keeps `@` (through the table's
    transpose it was 1-12% slower in 6 of 8 runs; docs/performance.md). Heads sit outside the
    remat'd blocks, so no remat policy needs to see this dot."""
    return dense_dot_general(x_btk, kernel_kn, (((x_btk.ndim - 1,), (0,)), ((), ())))


def dense(cfg: ModelConfig, d_in: int, d_out: int, *, rngs: nnx.Rngs, bias: bool | None = None,
          names: tuple[str, str] = ("embed", "features"), units: dict[str, int] | None = None):
    """A Linear layer with the model's initialiser, dtypes and bias switch; `names` are the
    kernel's logical axes (in, out)."""
    return nnx.Linear(d_in, d_out, use_bias=cfg.bias if bias is None else bias,
                      kernel_init=dense_init(cfg), rngs=rngs,
                      # a remat policy that names dots (dots_saveable, ...) must see lax's
                      dot_general=(dense_dot_general if cfg.remat in ("none", "full")
                                   else jax.lax.dot_general),
                      kernel_metadata=axes(*names, units=units),
                      bias_metadata=axes(names[1], units=units), **dtypes(cfg))


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """Gemma 2's soft cap, cap * tanh(x / cap): bounded in (-cap, cap), ~x where |x| << cap."""
    return x if cap is None else cap * jnp.tanh(x / cap)


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


class OutputHead(nnx.Module):
    """Next-token logits (B, T, vocab), float32, from final hidden states: through the token table
    (model.tie_embeddings, GPT-2 / T5) or a projection of its own (`lm_head`, Llama), then the
    optional final soft cap (Gemma 2). The models hold it as `lm_head` only when untied."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.kernel = None if cfg.tie_embeddings else nnx.Param(
            dense_init(cfg)(rngs.params(), (cfg.d_model, cfg.vocab_size), jnp.dtype(cfg.param_dtype)),
            **axes("embed", "vocab"))
        self.cap = cfg.final_logit_softcap

    def __call__(self, embed: Embed, hidden_btd: jax.Array) -> jax.Array:
        return softcap(self.unembed(embed, hidden_btd), self.cap)

    def unembed(self, embed: Embed, hidden_btd: jax.Array) -> jax.Array:
        """The logits before the soft cap: linear in `hidden_btd` (direct logit attribution,
        inference/lens.py, splits them over the residual stream's parts)."""
        if self.kernel is None:
            logits_btv = embed.attend(hidden_btd)
        else:
            logits_btv = project(hidden_btd, self.kernel[...].astype(hidden_btd.dtype))
            logits_btv = constrain(logits_btv, ("act_batch", "act_length", "act_vocab"))
        return logits_btv.astype(jnp.float32)


class MLP(nnx.Module):
    """Position-wise feed-forward. dense: down(act(up(x))); glu (Shazeer 2020): down(act(gate(x))
    * up(x)), so relu / gelu / silu / sigmoid give ReGLU / GEGLU / SwiGLU / GLU. The hidden width is
    model.mlp_hidden (2/3 of d_ff for a parameter-matched glu)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        hidden = cfg.mlp_hidden
        self.gate = (dense(cfg, cfg.d_model, hidden, rngs=rngs, names=("embed", "mlp"))
                     if cfg.mlp == "glu" else None)
        self.up = dense(cfg, cfg.d_model, hidden, rngs=rngs, names=("embed", "mlp"))
        self.down = dense(cfg, hidden, cfg.d_model, rngs=rngs, names=("mlp", "embed"))
        self.activation = ACTIVATION_FNS[cfg.activation]
        self.activation_name = cfg.activation
        self.sow_config = SowConfig()  # models/instrument.py

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        up_btf = constrain(self.up(x_btd), ("act_batch", "act_length", "act_mlp"))
        # the activation's input: the up projection, or the gate of a gated MLP
        pre_btf = (up_btf if self.gate is None
                   else constrain(self.gate(x_btd), ("act_batch", "act_length", "act_mlp")))
        activated_btf = self.activation(pre_btf)
        self.sow_config.maybe_sow_activation_stats(self, pre_btf, activated_btf)
        return self.down(activated_btf if self.gate is None else activated_btf * up_btf)


def make_norm(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module | None:
    """A block's or stack's norm: none when model.norm=none."""
    if cfg.norm == "none":
        return None
    return norm_layer(cfg, rngs=rngs)


def norm_layer(cfg: ModelConfig, features: int | None = None, axis_name: str = "embed", *,
               rngs: nnx.Rngs) -> nnx.LayerNorm | nnx.RMSNorm:
    """model.norm_type over the last axis (d_model unless `features`): LayerNorm (centre, scale,
    shift) or RMSNorm (scale only: x / rms(x) * g, Zhang & Sennrich 2019)."""
    features = features or cfg.d_model
    if cfg.norm_type == "rmsnorm":
        return nnx.RMSNorm(features, epsilon=cfg.layer_norm_eps, rngs=rngs,
                           scale_metadata=axes(axis_name), **dtypes(cfg))
    return nnx.LayerNorm(features, epsilon=cfg.layer_norm_eps, rngs=rngs,
                         scale_metadata=axes(axis_name), bias_metadata=axes(axis_name),
                         **dtypes(cfg))


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
        self.norm = norm_layer(cfg, rngs=rngs) if cfg.embed_norm else None
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
