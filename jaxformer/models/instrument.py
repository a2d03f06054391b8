"""What a model sows for inspection and diagnostics, injected from outside the model core.

Modules that can record hold a `sow_config` (a `SowConfig`, sowing nothing by default, so the graph
the train step compiles records nothing) and hand their values to it; the config decides what is
sown, as `nnx.Intermediate` variables (after flax's examples/gemma/sow_lib.py). `instrument(model,
config)` sets one config on every such module, on a copy the caller owns (diagnostics and inspect
instrument the copy they merge inside their own jit).

A `LayerStack` runs each layer on a slice of its stacked parameters, then stacks what the layers
sowed on a leading layer axis and leaves it on its `blocks`, at the parameters' paths:
`nnx.pop(model, nnx.Intermediate)` after a forward gives e.g.
`{'stack': {'blocks': {'attention': {'attention_weights': ((n_layers, B, heads, T, S),)}}}}`.
With `residual` each layer sows its input and output (`resid_pre`, `resid_post`), with
`sublayer_outputs` each Sublayer its branch's output before the residual add (`branch_output` of
`attention_branch`, `cross_attention_branch`, `mlp_branch`): the activation cache of
inference/activation_cache.py reads them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
from flax import nnx

from jaxformer.models.probes import activation_stats, output_stats

OUTPUT_PROBE = "output_probe"  # the zero nnx.Perturbation on each layer's output
RECORDS = ("output_stats", "activation_stats")  # what diagnostics read, in this order


@dataclasses.dataclass(frozen=True)
class SowConfig:
    layer_outputs: bool = False  # per layer: a zero probe on its output (its gradient is dL/dx_l),
    #                              and the output's mean and std
    activations: bool = False  # saturated / zero / dead fractions of each activation's outputs
    attention_weights: bool = False  # each attention's softmax weights (B, heads, T, S)
    residual: bool = False  # each layer's input and output stream (B, T, d_model)
    sublayer_outputs: bool = False  # each branch's output (attention, MLP) before the residual add

    def maybe_probe_layer_output(self, layer: nnx.Module, x: jax.Array) -> jax.Array:
        """`x` plus a zero probe (flax's `perturb`: its gradient is dL/dx) and its statistics."""
        if not self.layer_outputs:
            return x
        x = layer.perturb(OUTPUT_PROBE, x)
        layer.sow(nnx.Intermediate, "output_stats", output_stats(x))
        return x

    def maybe_sow_activation_stats(self, module: nnx.Module, pre: jax.Array, post: jax.Array):
        """`post = module.activation(pre)`; `module.activation_name` names the function."""
        if self.activations:
            module.sow(nnx.Intermediate, "activation_stats",
                       activation_stats(pre, post, module.activation_name, module.activation))

    def maybe_sow_attention_weights(self, module: nnx.Module, weights_fn: Callable[[], jax.Array]):
        """The weights are computed only when sown, beside the unchanged attention output."""
        if self.attention_weights:
            module.sow(nnx.Intermediate, "attention_weights", weights_fn())

    def maybe_sow_residual(self, layer: nnx.Module, x_in_btd: jax.Array, x_out_btd: jax.Array):
        """A layer's input and output residual stream."""
        if self.residual:
            layer.sow(nnx.Intermediate, "resid_pre", x_in_btd)
            layer.sow(nnx.Intermediate, "resid_post", x_out_btd)

    def maybe_sow_branch_output(self, sublayer: nnx.Module, h_btd: jax.Array):
        """What a branch adds to the stream (after dropout, before the residual add)."""
        if self.sublayer_outputs:
            sublayer.sow(nnx.Intermediate, "branch_output", h_btd)


DIAGNOSTICS = SowConfig(layer_outputs=True, activations=True)
ATTENTION_WEIGHTS = SowConfig(attention_weights=True)
ACTIVATIONS = SowConfig(attention_weights=True, residual=True, sublayer_outputs=True)


def instrument(model: nnx.Module, config: SowConfig) -> nnx.Module:
    """Hand `config` to every module of `model` that can sow (in place); returns `model`."""
    model.set_attributes(sow_config=config)
    return model


def layer_records(sown: nnx.State) -> dict[str, jax.Array]:
    """The diagnostics statistics a stack's layers sowed (its `blocks` Intermediates), merged into
    one dict of (n_layers,) arrays: the layer outputs' first, then the activations'."""
    found = [(path[-1], var) for path, var in nnx.to_flat_state(sown) if path[-1] in RECORDS]
    merged: dict[str, jax.Array] = {}
    for _, var in sorted(found, key=lambda item: RECORDS.index(item[0])):
        for record in var.get_value():
            merged.update(record)
    return merged
