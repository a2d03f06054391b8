"""The activation cache: one forward of a model with what happens inside it kept by readable names.

`run_with_cache(model, *model_inputs)` runs one jitted forward of an instrumented copy of `model`
(models/instrument.py's `ACTIVATIONS`: the layers sow their residual stream, each branch its output,
each attention its weights; `model` itself and the train step sow nothing) and returns the model's
output with an `ActivationCache`:

    blocks.{i}.resid_pre        (B, T, d_model)  the stream into block i (block 0: the embeddings)
    blocks.{i}.attn_out         (B, T, d_model)  what self-attention adds to the stream
    blocks.{i}.cross_attn_out   (B, T, d_model)  what cross-attention adds (encoder-decoder decoder)
    blocks.{i}.mlp_out          (B, T, d_model)  what the MLP adds
    blocks.{i}.resid_post       (B, T, d_model)  the stream out of block i (= resid_pre of i + 1)
    blocks.{i}.attn_pattern     (B, heads, T, S) self-attention weights (rows sum to 1)
    blocks.{i}.cross_attn_pattern                cross-attention weights, keys in the source
    final_norm_out              (B, T, d_model)  the last stream through the final norm (the last
                                                 resid_post where the model has no final norm)

A decoder or an encoder has one stack and its names start at `blocks`; an encoder-decoder's start
with `encoder.` or `decoder.`. The branch outputs are taken after dropout and before the residual
add, so for a pre-norm (or norm-free) residual block resid_post = resid_pre + attn_out (+
cross_attn_out) + mlp_out; a post-norm block normalises that sum.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.errors import UserError
from jaxformer.models.blocks import LayerStack
from jaxformer.models.instrument import ACTIVATIONS, instrument

# a model's layer stacks (the attributes the families give them) and the norm after each
STACKS = (("stack", "final_norm"), ("encoder", "encoder_norm"), ("decoder", "decoder_norm"))
# what the blocks sow (path under a stack's `blocks`) -> its name in the cache
SOWN_NAMES = {
    ("resid_pre",): "resid_pre",
    ("attention_branch", "branch_output"): "attn_out",
    ("cross_attention_branch", "branch_output"): "cross_attn_out",
    ("mlp_branch", "branch_output"): "mlp_out",
    ("resid_post",): "resid_post",
    ("attention", "attention_weights"): "attn_pattern",
    ("cross_attention", "attention_weights"): "cross_attn_pattern",
}
BRANCHES = ("attn_out", "cross_attn_out", "mlp_out")  # what a block adds to the stream, in order


def stack_prefix(stack: str) -> str:
    """The names' prefix of a stack's entries: none for a single-stack model's `stack`."""
    return "" if stack == "stack" else f"{stack}."


def model_stacks(model: nnx.Module) -> list[tuple[str, nnx.Module | None]]:
    """(stack attribute, its final norm or None) of each layer stack of `model`, inputs first."""
    stacks = [(stack, getattr(model, norm, None)) for stack, norm in STACKS
              if isinstance(getattr(model, stack, None), LayerStack)]
    if not stacks:
        raise UserError(f"a {type(model).__name__} has no transformer blocks to cache: the "
                        "activation cache reads decoder, encoder and encoder_decoder models")
    return stacks


class ActivationCache(dict):
    """name -> array, the names of the module docstring; helpers read one stack's entries
    (`stack`: '' for a single-stack model, 'encoder' or 'decoder')."""

    def n_layers(self, stack: str = "") -> int:
        prefix = stack_prefix(stack or "stack")
        return sum(1 for name in self if name.startswith(prefix + "blocks.")
                   and name.endswith(".resid_pre"))

    def residual_stream(self, stack: str = "") -> jax.Array:
        """(n_layers + 1, B, T, d_model): the embeddings (block 0's resid_pre), then the stream
        after each block."""
        prefix = stack_prefix(stack or "stack")
        return jnp.stack([self[f"{prefix}blocks.0.resid_pre"]]
                         + [self[f"{prefix}blocks.{i}.resid_post"]
                            for i in range(self.n_layers(stack))])

    def components(self, stack: str = "") -> tuple[list[str], jax.Array]:
        """The parts the last stream of a residual, pre-norm stack is the sum of: names
        ('embed', then each block's branch outputs) and (parts, B, T, d_model)."""
        prefix = stack_prefix(stack or "stack")
        names = ["embed"] + [f"{prefix}blocks.{i}.{branch}"
                             for i in range(self.n_layers(stack)) for branch in BRANCHES
                             if f"{prefix}blocks.{i}.{branch}" in self]
        parts = [self[f"{prefix}blocks.0.resid_pre"]] + [self[name] for name in names[1:]]
        return names, jnp.stack(parts)


def run_with_cache(model: nnx.Module, *model_inputs) -> tuple[jax.Array, ActivationCache]:
    """`model(*model_inputs)` (logits; an encoder's final hidden states) and its activations.

    One jitted forward of an instrumented copy (`model` is untouched; one compile beats eager
    op-by-op dispatch). Inputs are what the model's __call__ takes, e.g. `(tokens_bt,)` for a
    decoder, `(src_bs, None, tgt_bt)` for an encoder-decoder."""
    stacks = tuple(stack for stack, _ in model_stacks(model))
    graphdef, state = nnx.split(model)
    output, sown, final = _forward(graphdef, state, model_inputs, stacks)
    cache = ActivationCache()
    for stack in stacks:
        # (n_layers, ...) each: the stack's layer axis leads
        stacked = {SOWN_NAMES[tuple(path)]: var.get_value()[-1]
                   for path, var in nnx.to_flat_state(sown[stack]["blocks"])
                   if tuple(path) in SOWN_NAMES}
        prefix = stack_prefix(stack)
        for layer in range(stacked["resid_pre"].shape[0]):
            for name in SOWN_NAMES.values():  # the forward's order
                if name in stacked:
                    cache[f"{prefix}blocks.{layer}.{name}"] = stacked[name][layer]
        cache[f"{prefix}final_norm_out"] = final[stack]
    return output, cache


@partial(jax.jit, static_argnames=("graphdef", "stacks"))
def _forward(graphdef, state, model_inputs, stacks):
    copy = instrument(nnx.merge(graphdef, state), ACTIVATIONS)
    output = copy(*model_inputs)
    sown = nnx.pop(copy, nnx.Intermediate)
    norms = dict(model_stacks(copy))
    final = {}
    for stack in stacks:
        last_btd = sown[stack]["blocks"]["resid_post"].get_value()[-1][-1]
        final[stack] = last_btd if norms[stack] is None else norms[stack](last_btd)
    return output, sown, final
