"""TrainState: everything a step reads and writes, as one pytree (so orbax saves it whole)."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from jaxformer.config import ModelConfig
from jaxformer.models import build_model, split_model
from jaxformer.parallel import tree_shardings


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: nnx.State  # the model's nnx.Param leaves
    opt_state: optax.OptState
    rng: jax.Array  # uint32 key data; the step's dropout key is fold_in(rng, step)
    skipped: jax.Array  # int32 scalar: steps whose non-finite loss/gradient was not applied


def create_train_state(params: nnx.State, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
        skipped=jnp.zeros((), jnp.int32),
    )


@dataclass(frozen=True)
class StateLayout:
    """The train state known before any array exists: structure, shapes and placement."""

    graphdef: nnx.GraphDef
    rest: nnx.State  # non-trainable model state
    abstract: TrainState  # ShapeDtypeStruct leaves
    shardings: TrainState  # NamedSharding leaves, from the parameters' logical axis names


def state_layout(model_cfg: ModelConfig, tx: optax.GradientTransformation, seed: int,
                 mesh: Mesh) -> StateLayout:
    """Abstract first (nnx.eval_shape): shapes and shardings without allocating anything."""
    graphdef, abstract_params, rest = split_model(nnx.eval_shape(lambda: build_model(model_cfg, seed)))
    abstract = jax.eval_shape(lambda params: create_train_state(params, tx, seed), abstract_params)
    return StateLayout(graphdef, rest, abstract, tree_shardings(abstract, mesh))


def init_train_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, seed: int,
                     shardings: TrainState) -> TrainState:
    """A fresh state, initialised under jit straight into its shards: no device ever holds a
    full copy of a sharded parameter or optimizer moment."""
    def init() -> TrainState:
        return create_train_state(split_model(build_model(model_cfg, seed))[1], tx, seed)
    return jax.jit(init, out_shardings=shardings)()
