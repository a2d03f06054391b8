"""TrainState: everything a step reads and writes, as one pytree (so orbax saves it whole)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: nnx.State  # the model's nnx.Param leaves
    opt_state: optax.OptState
    rng: jax.Array  # uint32 key data; the step's dropout key is fold_in(rng, step)


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, params, rest): rest holds non-trainable state (empty for the current models)."""
    return nnx.split(model, nnx.Param, ...)


def create_train_state(params: nnx.State, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def count_params(params: nnx.State) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(params))
