"""The logit lens and direct logit attribution, read from an activation cache.

Logit lens (nostalgebraist 2020): the residual stream after each layer (the embeddings, then each
block's output) decoded as if it were the last one, through the model's own final norm and output
layer (`model.logits`), so the last layer's lens is the model's logits. Per layer and position:
the top tokens and their probabilities, and the probability and rank of a target token.

Direct logit attribution: a pre-norm residual stack's last stream is a sum of parts, the
embeddings and what each branch (attention, MLP) of each block added; the target token's logit
splits over them once the final norm is linearised. The linearisation freezes the norm's scale at
the final stream's: LayerNorm(x) = (x - mean x) / sqrt(var x + eps) * g + b with the divisor taken
from the whole final stream x, is then linear in x, the centring applied to each part, g to each,
the shift b a part of its own ("bias"); RMSNorm the same without centring or shift. With that
divisor frozen the split is exact: the parts sum to the target's logit (before a final soft cap,
model.final_logit_softcap, which is not linear) to float rounding. It does not say what a part
would do alone (its own norm scale would differ), only how much of this forward's logit it carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.errors import UserError
from jaxformer.inference.activation_cache import ActivationCache
from jaxformer.models.decoder import Decoder
from jaxformer.models.encoder_decoder import EncoderDecoder

# the families with a next-token output layer: the stack it reads and the norm before it
READOUTS = ((Decoder, "stack", "final_norm"), (EncoderDecoder, "decoder", "decoder_norm"))


def readout(model: nnx.Module) -> tuple[str, str]:
    """(stack, final norm attribute) of the stack `model.logits` reads."""
    for family, stack, norm in READOUTS:
        if isinstance(model, family):
            return stack, norm
    raise UserError(f"the logit lens decodes through a next-token output layer; "
                    f"{type(model).__name__} models have none: use a decoder or encoder_decoder "
                    "run")


def cache_stack(stack: str) -> str:
    """ActivationCache's name of a stack: '' for a single-stack model."""
    return "" if stack == "stack" else stack


# -- the logit lens -------------------------------------------------------------------------------
@dataclass(frozen=True)
class LogitLens:
    layers: list[str]  # 'embed', 'block 0', ..., 'block L-1': the stream after each
    top_ids_lbtk: np.ndarray  # the k most likely tokens at each layer and position, best first
    top_probs_lbtk: np.ndarray
    target_ids_bt: np.ndarray | None = None  # -1: no target at that position
    target_probs_lbt: np.ndarray | None = None  # NaN where there is no target
    target_ranks_lbt: np.ndarray | None = None  # 1: the top token; 0 where there is no target

    def settled_layers(self) -> np.ndarray:
        """(B, T): the first layer (index into `layers`) from which the target is the top token
        at every later layer; -1 where it is not the top token at the last layer (or no target)."""
        top_lbt = self.target_ranks_lbt == 1
        stays_lbt = np.flip(np.logical_and.accumulate(np.flip(top_lbt, 0), axis=0), 0)
        n_layers = top_lbt.shape[0]
        first_bt = n_layers - stays_lbt.sum(0)
        return np.where(stays_lbt[-1], first_bt, -1)


def lens_logits(model: nnx.Module, cache: ActivationCache) -> jax.Array:
    """(n_layers + 1, B, T, vocab) float32: each layer's stream through the final norm and the
    output layer; the last equals the model's logits."""
    stack, norm = readout(model)
    graphdef, state = nnx.split(model)
    return _lens_logits(graphdef, state, cache.residual_stream(cache_stack(stack)), norm)


@partial(jax.jit, static_argnames=("graphdef", "norm"))
def _lens_logits(graphdef, state, stream_lbtd, norm):
    model = nnx.merge(graphdef, state)
    final_norm = getattr(model, norm)
    return jax.lax.map(lambda x_btd: model.logits(x_btd if final_norm is None
                                                  else final_norm(x_btd)), stream_lbtd)


def logit_lens(model: nnx.Module, cache: ActivationCache, target_ids_bt=None,
               k: int = 5) -> LogitLens:
    """The lens's top-k tokens per layer and position and, with `target_ids_bt` (B, T; -1 for no
    target), each target's probability and rank (1: the top token)."""
    logits_lbtv = lens_logits(model, cache)
    probs_lbtv = jax.nn.softmax(logits_lbtv, axis=-1)
    top_probs, top_ids = jax.lax.top_k(probs_lbtv, min(k, probs_lbtv.shape[-1]))
    layers = ["embed"] + [f"block {i}" for i in range(logits_lbtv.shape[0] - 1)]
    if target_ids_bt is None:
        return LogitLens(layers, np.asarray(top_ids), np.asarray(top_probs))
    target_ids_bt = np.asarray(target_ids_bt)
    has_target_bt = target_ids_bt >= 0
    index_lbt1 = np.broadcast_to(np.where(has_target_bt, target_ids_bt, 0)[None, ..., None],
                                 (*logits_lbtv.shape[:-1], 1))
    target_logits_lbt = jnp.take_along_axis(logits_lbtv, index_lbt1, axis=-1)
    ranks_lbt = 1 + (logits_lbtv > target_logits_lbt).sum(-1)
    target_probs_lbt = jnp.take_along_axis(probs_lbtv, index_lbt1, axis=-1)[..., 0]
    return LogitLens(layers, np.asarray(top_ids), np.asarray(top_probs), target_ids_bt,
                     np.where(has_target_bt, np.asarray(target_probs_lbt), np.nan),
                     np.where(has_target_bt, np.asarray(ranks_lbt), 0))


# -- direct logit attribution ---------------------------------------------------------------------
@dataclass(frozen=True)
class LogitAttribution:
    names: list[str]  # 'embed', 'blocks.0.attn_out', 'blocks.0.mlp_out', ..., 'bias'
    contributions_cbt: np.ndarray  # each part's share of the target's logit; 0 where no target
    logit_bt: np.ndarray  # the target's logit (before a final soft cap): the parts' sum


def frozen_norm(norm: nnx.Module | None, x_btd: jax.Array) -> tuple[Callable, jax.Array]:
    """The final norm linearised at the stream `x_btd` (module docstring): (part -> its share of
    norm(x_btd) without the shift, the shift (B, T, d_model)); the shares sum to norm(x_btd)
    minus the shift."""
    x_btd = x_btd.astype(jnp.float32)
    if norm is None:
        return (lambda part: part), jnp.zeros_like(x_btd)
    if isinstance(norm, nnx.LayerNorm):
        def centre(part):
            return part - part.mean(-1, keepdims=True)
        divisor_bt1 = jnp.sqrt(x_btd.var(-1, keepdims=True) + norm.epsilon)
        shift_d = 0.0 if norm.bias is None else norm.bias[...]
    elif isinstance(norm, nnx.RMSNorm):
        def centre(part):
            return part
        divisor_bt1 = jnp.sqrt(jnp.mean(jnp.square(x_btd), -1, keepdims=True) + norm.epsilon)
        shift_d = 0.0
    else:
        raise UserError(f"direct logit attribution linearises a LayerNorm or RMSNorm, "
                        f"not a {type(norm).__name__}")
    gain_d = 1.0 if norm.scale is None else norm.scale[...]

    def share(part_btd):
        return centre(part_btd.astype(jnp.float32)) / divisor_bt1 * gain_d

    return share, jnp.broadcast_to(jnp.asarray(shift_d, jnp.float32), x_btd.shape)


def check_additive(model: nnx.Module, stack: str) -> None:
    """The last stream is the sum of the parts only for residual blocks without post-norm."""
    branch = getattr(model, stack).blocks.attention_branch
    if not branch.residual or branch.placement == "post":
        raise UserError(
            f"direct logit attribution splits a residual stream that is a sum of block outputs: "
            f"this model has model.residual={branch.residual}, model.norm={branch.placement!r}; "
            f"it needs model.residual=true and model.norm=pre (or none)")


def direct_logit_attribution(model: nnx.Module, cache: ActivationCache,
                             target_ids_bt) -> LogitAttribution:
    """Each part of the last residual stream's share of the target token's logit (B, T; -1: no
    target), with the final norm linearised at the final stream (module docstring)."""
    stack, norm = readout(model)
    check_additive(model, stack)
    names, parts_cbtd = cache.components(cache_stack(stack))
    target_ids_bt = np.asarray(target_ids_bt)
    has_target_bt = target_ids_bt >= 0
    final_btd = cache.residual_stream(cache_stack(stack))[-1]
    graphdef, state = nnx.split(model)
    contributions_cbt, logit_bt = _attribute(
        graphdef, state, parts_cbtd, final_btd,
        jnp.asarray(np.where(has_target_bt, target_ids_bt, 0)), norm)
    return LogitAttribution(names + ["bias"],
                            np.where(has_target_bt, np.asarray(contributions_cbt), 0.0),
                            np.where(has_target_bt, np.asarray(logit_bt), np.nan))


@partial(jax.jit, static_argnames=("graphdef", "norm"))
def _attribute(graphdef, state, parts_cbtd, final_btd, target_ids_bt, norm):
    model = nnx.merge(graphdef, state)
    share, shift_btd = frozen_norm(getattr(model, norm), final_btd)

    def target_logit(hidden_btd):  # the output layer is linear before its soft cap
        logits_btv = model.lm_head.unembed(model.embed, hidden_btd.astype(final_btd.dtype))
        return jnp.take_along_axis(logits_btv, target_ids_bt[..., None], axis=-1)[..., 0]

    shares_cbt = jax.lax.map(lambda part_btd: target_logit(share(part_btd)), parts_cbtd)
    final_norm = getattr(model, norm)
    logit_bt = target_logit(final_btd if final_norm is None else final_norm(final_btd))
    return jnp.concatenate([shares_cbt, target_logit(shift_btd)[None]]), logit_bt
