"""The statistics per-layer diagnostics (`jaxformer/training/diagnostics.py`) record inside a model: of each
layer's output (mean, std) and of each activation function's outputs (saturation, zeros, dead
units). Where and when they are recorded is models/instrument.py's `SowConfig`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# sigmoid counts as saturated outside [0.01, 0.99] (slope below ~0.01); any other activation where
# its slope |f'(pre-activation)| < SATURATED_SLOPE (relu: exactly where it outputs zero)
SIGMOID_SATURATED = (0.01, 0.99)
SATURATED_SLOPE = 0.01


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


def output_stats(x: jax.Array) -> dict[str, jax.Array]:
    """Mean and std of a layer's output over every element."""
    x = x.astype(jnp.float32)
    return {"act_mean": x.mean(), "act_std": x.std()}
