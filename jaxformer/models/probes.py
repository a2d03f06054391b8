"""What a model records for per-layer diagnostics (`jaxformer.diagnostics`), and only then.

Modules with a `diagnose` attribute (layer stacks, MLPs, plain dense layers) keep it False, so the
graph the train step compiles holds no probe and records nothing. The diagnostics function flips it
on a copy of the model inside its own jit:
  - a stack adds a zero `probe` (n_layers, *layer output shape) to its layers' outputs, so the
    gradient with respect to the probe is the gradient with respect to each layer's output, and it
    records each layer output's mean and std;
  - an activation records statistics of its outputs (saturation, zeros, dead units).
Records are `LayerRecord` variables holding dicts of scalars (per stack: (n_layers,) arrays).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# sigmoid counts as saturated outside [0.01, 0.99] (slope below ~0.01); any other activation where
# its slope |f'(pre-activation)| < SATURATED_SLOPE (relu: exactly where it outputs zero)
SIGMOID_SATURATED = (0.01, 0.99)
SATURATED_SLOPE = 0.01


class LayerRecord(nnx.Intermediate):
    """Statistics written by a forward pass in diagnose mode: a dict of arrays."""


def enable_diagnostics(model: nnx.Module) -> None:
    """Switch every module of `model` that can record into diagnose mode (in place)."""
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "diagnose"):
            module.diagnose = True


def activation_stats(pre: jax.Array, post: jax.Array, activation: str, fn) -> dict[str, jax.Array]:
    """Scalars about an activation's outputs `post = fn(pre)`; the last axis indexes the units.

    saturated_frac: share of outputs where the slope is about zero (see SATURATED_SLOPE);
    zero_frac: share of outputs that are exactly 0; dead_frac: share of units that output 0 for
    every example (and position) of the batch.
    """
    if activation == "sigmoid":
        low, high = SIGMOID_SATURATED
        saturated = (post < low) | (post > high)
    else:  # the activation is elementwise, so a jvp with ones gives f'(pre) everywhere
        slope = jax.jvp(fn, (pre,), (jnp.ones_like(pre),))[1]
        saturated = jnp.abs(slope) < SATURATED_SLOPE
    zero = post == 0
    dead_units = zero.reshape(-1, zero.shape[-1]).all(axis=0)
    return {
        "saturated_frac": saturated.mean(dtype=jnp.float32),
        "zero_frac": zero.mean(dtype=jnp.float32),
        "dead_frac": dead_units.mean(dtype=jnp.float32),
    }


def record_activation(module: nnx.Module, pre: jax.Array, post: jax.Array) -> None:
    """Called by modules with `activation`, `activation_name` and `diagnose` attributes."""
    if module.diagnose:
        module.activation_record = LayerRecord(
            activation_stats(pre, post, module.activation_name, module.activation)
        )


def pop_records(module: nnx.Module) -> dict[str, jax.Array]:
    """Remove the LayerRecords written inside `module` and merge their dicts into one."""
    merged: dict[str, jax.Array] = {}
    for record in jax.tree.leaves(nnx.pop(module, LayerRecord),
                                  is_leaf=lambda x: isinstance(x, nnx.Variable)):
        merged.update(record.get_value())
    return merged


def output_stats(x: jax.Array) -> dict[str, jax.Array]:
    """Mean and std of a layer's output over every element."""
    x = x.astype(jnp.float32)
    return {"act_mean": x.mean(), "act_std": x.std()}
