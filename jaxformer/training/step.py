"""The pure train and eval steps: merge the model inside jit, compute, return a new state.

The graphdef is closed over (static); the TrainState is donated so XLA updates it in place.
"""

from __future__ import annotations

from typing import Callable

import jax
import optax
from flax import nnx

from jaxformer.objectives import model_loss
from jaxformer.training.state import TrainState

Batch = dict[str, jax.Array]


def dropout_key(state: TrainState) -> jax.Array:
    """The dropout key of the step `state` is about to take."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def training_loss(model: nnx.Module, batch: Batch, objective: str, key: jax.Array):
    """(loss, metrics) as the train step differentiates them: dropout on, drawn from `key`."""
    rngs = nnx.Rngs(dropout=key)  # made inside the grad trace that draws from it
    return model_loss(model, batch, objective, deterministic=False, rngs=rngs)


def make_train_step(
    graphdef: nnx.GraphDef, rest: nnx.State, tx: optax.GradientTransformation,
    schedule: optax.Schedule, objective: str,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        key = dropout_key(state)

        def loss_fn(params):
            return training_loss(nnx.merge(graphdef, params, rest), batch, objective, key)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "grad_norm": optax.global_norm(grads), "lr": schedule(state.step)}
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return jax.jit(train_step, donate_argnums=0)


def make_eval_step(
    graphdef: nnx.GraphDef, rest: nnx.State, objective: str
) -> Callable[[nnx.State, Batch], dict]:
    def eval_step(params: nnx.State, batch: Batch) -> dict:
        return model_loss(nnx.merge(graphdef, params, rest), batch, objective)[1]

    return jax.jit(eval_step)
