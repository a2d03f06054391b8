"""The pure train and eval steps: merge the model inside jit, compute, return a new state.

The graphdef is closed over (static); the TrainState is donated so XLA updates it in place. With a
mesh, the step is jitted with explicit shardings (state as its logical axes say, batch split over
data x fsdp, metrics replicated) and GSPMD inserts the collectives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Sharding

from jaxformer.errors import UserError
from jaxformer.objectives import LOG_Z_SQ, Objective
from jaxformer.parallel import constrain
from jaxformer.training.state import TrainState

Batch = dict[str, jax.Array]
MEANS = ("loss", "accuracy")  # the train metrics that are means over `count`
Z_LOSS = "z_loss"  # and with optim.z_loss > 0: z_loss x mean (log Z)^2, as added to the loss


def dropout_key(state: TrainState) -> jax.Array:
    """The dropout key of the step `state` is about to take."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def training_loss(model: nnx.Module, batch: Batch, objective: Objective, key: jax.Array,
                  z_loss: float = 0.0):
    """(loss, metrics) as the train step differentiates them: dropout on, drawn from `key`.

    With z_loss > 0 the loss adds PaLM's z-loss, z_loss x the mean (log Z)^2 over the predicted
    tokens (Z = sum exp logits), logged as "z_loss"; metrics["loss"] stays the cross-entropy."""
    rngs = nnx.Rngs(dropout=key)  # made inside the grad trace that draws from it
    loss, metrics = objective.loss(model, batch, deterministic=False, rngs=rngs)
    log_z_sq = metrics.pop(LOG_Z_SQ, None)  # unused without the z-loss: XLA prunes it
    if z_loss > 0:
        if log_z_sq is None:
            raise UserError(f"optim.z_loss={z_loss}: the {objective.name} objective has no "
                            "logits to take log Z of: set optim.z_loss=0")
        metrics[Z_LOSS] = z_loss * log_z_sq
        loss = loss + metrics[Z_LOSS]
    return loss, metrics


@dataclass(frozen=True)
class StepShardings:
    """Where the step's inputs and outputs live (see jaxformer.parallel)."""

    state: TrainState  # a TrainState-shaped pytree of shardings
    batch: Sharding  # every batch field: rows split over data x fsdp
    replicated: Sharding  # metrics


def micro_batches(batch: Batch, grad_accum: int) -> Batch:
    """(B, ...) -> (grad_accum, B / grad_accum, ...), micro-batch a taking rows a, a + A, ...

    Strided rows keep every micro-batch spread over all data-parallel devices (contiguous chunks
    would each live on a few devices and force a reshuffle)."""
    def split(x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)
        return constrain(x, (None, "act_batch") + (None,) * (x.ndim - 2))
    return jax.tree.map(split, batch)


def accumulate_gradients(loss_fn: Callable, params: nnx.State, batch: Batch, grad_accum: int,
                         key: jax.Array, means: tuple[str, ...] = MEANS,
                         ) -> tuple[nnx.State, dict]:
    """Gradients and metrics of the whole batch from `grad_accum` sequential micro-batches.

    Each micro-batch's mean loss is weighted by its token (or example) count, so the result equals
    one pass over the full batch: same loss, same gradient, 1/grad_accum of the activations.
    `means`: the metrics kept, each a mean over the count (pooled the same way)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
        (_, metrics), grads = grad_fn(params, batch, key)
        return grads, metrics

    def body(carry, micro):
        grad_sum, sums, count_sum = carry
        index, micro_batch = micro
        (_, metrics), grads = grad_fn(params, micro_batch, jax.random.fold_in(key, index))
        count = metrics["count"]
        grad_sum = jax.tree.map(lambda total, g: total + g * count, grad_sum, grads)
        sums = {name: sums[name] + metrics[name] * count for name in means}
        return (grad_sum, sums, count_sum + count), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (zeros, {name: jnp.zeros(()) for name in means}, jnp.zeros(()))
    xs = (jnp.arange(grad_accum), micro_batches(batch, grad_accum))
    (grad_sum, sums, count), _ = jax.lax.scan(body, init, xs)
    total = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / total, grad_sum)
    return grads, {**{name: value / total for name, value in sums.items()}, "count": count}


# On CPU, XLA lowers float32 matmuls to YNNPACK by default; XNNPACK's kernels run the train step
# up to 10% faster at the benchmark shapes (decoder 10%, encoder-decoder 7%, encoder ~0;
# docs/performance.md). Only the train step asks for them:
# single-token decoding is ~25% slower with them. Set per jit, not through XLA_FLAGS, so nothing
# else in the process changes.
CPU_TRAIN_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "",
                              "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def train_compiler_options() -> dict | None:
    return CPU_TRAIN_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None


def make_train_step(
    graphdef: nnx.GraphDef, rest: nnx.State, tx: optax.GradientTransformation,
    schedule: optax.Schedule, objective: Objective, *, grad_accum: int = 1,
    shardings: StepShardings | None = None, z_loss: float = 0.0,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """The jitted train step; `z_loss` (optim.z_loss) > 0 adds the z-loss (see training_loss)."""
    means = (*MEANS, Z_LOSS) if z_loss > 0 else MEANS

    def loss_fn(params: nnx.State, batch: Batch, key: jax.Array):
        return training_loss(nnx.merge(graphdef, params, rest), batch, objective, key, z_loss)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        grads, metrics = accumulate_gradients(loss_fn, state.params, batch, grad_accum,
                                              dropout_key(state), means)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.global_norm(grads)
        # a NaN/Inf loss or gradient never reaches the parameters or the optimizer moments: the
        # step is counted as skipped and the host decides whether to stop (trainer.nonfinite)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_state = state.replace(
            step=state.step + 1, params=jax.tree.map(keep, params, state.params),
            opt_state=jax.tree.map(keep, opt_state, state.opt_state),
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        metrics = {**metrics, "grad_norm": grad_norm, "lr": schedule(state.step),
                   "nonfinite": (~finite).astype(jnp.float32), "skipped_steps": new_state.skipped}
        return new_state, metrics

    options = train_compiler_options()
    if shardings is None:
        return jax.jit(train_step, donate_argnums=0, compiler_options=options)
    return jax.jit(
        train_step, donate_argnums=0, compiler_options=options,
        in_shardings=(shardings.state, shardings.batch),
        out_shardings=(shardings.state, shardings.replicated),
    )


def make_eval_step(
    graphdef: nnx.GraphDef, rest: nnx.State, objective: Objective
) -> Callable[[nnx.State, Batch], dict]:
    def eval_step(params: nnx.State, batch: Batch) -> dict:
        metrics = objective.loss(nnx.merge(graphdef, params, rest), batch)[1]
        metrics.pop(LOG_Z_SQ, None)  # a training term: not computed for held-out batches
        return metrics

    return jax.jit(eval_step)
