"""Per-layer training diagnostics for every model family (`trainer.diagnostics_every=N`).

`make_diagnostics` builds a jitted function of (train state, batch), separate from the train step
(which stays as fast as without diagnostics); the loop calls it at step 0 and every N steps, on the
batch the next update will use, before that update. For every LayerStack of the model (one for the
decoder, encoder and mlp; encoder and decoder for encoder_decoder) it measures, per layer l:

  grad_norm       ||dL/dtheta_l||: all parameters of layer l
  act_grad_norm   ||dL/dx_l|| for the layer's output x_l (whole batch): the gradient w.r.t. a zero
                  probe added to x_l, which works inside lax.scan (models/instrument.py)
  act_mean/std    of x_l
  saturated_frac, zero_frac, dead_frac   of the activation function's outputs inside layer l
                  (sigmoid: outside [0.01, 0.99]; relu: zeros; dead: zero for the whole batch)
  update_ratio    ||u_l|| / ||theta_l|| for the update u the optimizer makes from this batch

and per stack `grad_ratio` = grad_norm of the first layer / the last (and `act_grad_ratio`). The
loss and gradients are exactly the train step's: same dropout key, and the probes add zeros.

`diagnostics_metrics` flattens a result into wandb-chartable keys: `grad_norm/layer_07` (with the
stack's name when there are several: `grad_norm/decoder/layer_07`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxformer.models.blocks import LayerStack
from jaxformer.models.instrument import DIAGNOSTICS, instrument, layer_records
from jaxformer.objectives import Objective
from jaxformer.training.state import TrainState
from jaxformer.training.step import Batch, dropout_key, training_loss

FIRST_LAST_STATS = ("grad_norm", "act_grad_norm")  # each gets a first/last-layer ratio


def find_stacks(model: nnx.Module) -> dict[str, tuple[tuple, LayerStack]]:
    """{name: (path, stack)} for every LayerStack of `model`, named by their path ('stack')."""
    return {"/".join(map(str, path)): (path, module) for path, module in nnx.iter_modules(model)
            if isinstance(module, LayerStack)}


def _scaled_norm(x_ln: jax.Array) -> jax.Array:
    """(L,) L2 norms over axis 1, scaled by the max first: a deep sigmoid stack's first-layer
    gradients (~1e-21) would square to below float32's smallest normal and flush to zero."""
    peak_l = jnp.max(jnp.abs(x_ln), axis=1)
    safe_l = jnp.where(peak_l > 0, peak_l, 1.0)
    return peak_l * jnp.sqrt(jnp.sum(jnp.square(x_ln / safe_l[:, None]), axis=1))


def per_layer_norms(stacked: Any) -> jax.Array:
    """(n_layers,) L2 norms of a pytree whose leaves all carry a leading layer axis."""
    leaves = [leaf.astype(jnp.float32) for leaf in jax.tree.leaves(stacked)]
    norms_l_leaf = jnp.stack([_scaled_norm(leaf.reshape(leaf.shape[0], -1)) for leaf in leaves], 1)
    return _scaled_norm(norms_l_leaf)


def _at(state: nnx.State, path: tuple) -> nnx.State:
    for key in path:
        state = state[key]
    return state


def make_diagnostics(
    graphdef: nnx.GraphDef, rest: nnx.State, tx: optax.GradientTransformation,
    objective: Objective, z_loss: float = 0.0,
) -> Callable[[TrainState, Batch], dict]:
    def diagnosing_model(params: nnx.State) -> tuple[nnx.Module, dict]:
        model = nnx.merge(graphdef, params, rest)  # a copy: the train step's graph is untouched
        return instrument(model, DIAGNOSTICS), find_stacks(model)

    def diagnostics(state: TrainState, batch: Batch) -> dict:
        key = dropout_key(state)
        paths: dict[str, tuple] = {}  # static: where each stack's parameters sit

        def probe_zeros() -> nnx.State:  # traced for shapes only: the layers make their probes
            model, stacks = diagnosing_model(state.params)
            training_loss(model, batch, objective, key, z_loss)
            paths.update({name: path for name, (path, _) in stacks.items()})
            return nnx.pop(model, nnx.Perturbation)

        probes = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(probe_zeros))

        def loss_fn(params, probes):
            model, _ = diagnosing_model(params)
            nnx.update(model, probes)
            loss, _ = training_loss(model, batch, objective, key, z_loss)
            sown = nnx.pop(model, nnx.Intermediate)
            return loss, {name: layer_records(_at(sown, (*path, "blocks")))
                          for name, path in paths.items()}

        (loss, records), (grads, probe_grads) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True)(state.params, probes)
        updates, _ = tx.update(grads, state.opt_state, state.params)
        layers = {}
        for name, path in paths.items():
            blocks = (*path, "blocks")
            layers[name] = {
                "grad_norm": per_layer_norms(_at(grads, blocks)),
                "act_grad_norm": per_layer_norms(_at(probe_grads, blocks)),
                "update_ratio": (per_layer_norms(_at(updates, blocks))
                                 / per_layer_norms(_at(state.params, blocks))),
                **records[name],
            }
        return {"loss": loss, "grad_norm": optax.global_norm(grads), "layers": layers}

    return jax.jit(diagnostics)


def _ratio(first: float, last: float) -> float:
    if last > 0:
        return first / last
    return float("nan") if first == 0 else float("inf")  # nan: no gradient reaches either layer


def diagnostics_metrics(result: dict) -> dict[str, float]:
    """A diagnostics result as flat floats: loss, grad_norm, `STAT/[STACK/]layer_NN`, ratios."""
    result = jax.device_get(result)
    metrics = {"loss": float(result["loss"]), "grad_norm": float(result["grad_norm"])}
    several = len(result["layers"]) > 1
    for name, stats in result["layers"].items():
        prefix, suffix = (f"{name}/", f"/{name}") if several else ("", "")
        n_layers = len(stats["grad_norm"])
        width = max(2, len(str(n_layers - 1)))
        for stat, values in stats.items():
            for index, value in enumerate(values):
                metrics[f"{stat}/{prefix}layer_{index:0{width}d}"] = float(value)
        for stat in FIRST_LAST_STATS:
            ratio_name = stat.replace("_norm", "_ratio")
            metrics[f"{ratio_name}{suffix}"] = _ratio(float(stats[stat][0]), float(stats[stat][-1]))
    return metrics
