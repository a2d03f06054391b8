"""The optimisation axes (training/optim.py, the z-loss in training/step.py): learning-rate schedules
against their closed forms, every optimizer on a tiny decoder (alone and under a freeze plan), the
weight-decay mask switch, Muon's per-layer matrices, the z-loss, and their bad values."""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import compose_train, replace, tiny_config
from jaxformer.config import (
    OPTIMIZERS, FinetuneConfig, OptimConfig, register_configs, to_train_config,
)
from jaxformer.data.tasks import build_task
from jaxformer.errors import UserError
from jaxformer.models import build_model, split_model
from jaxformer.objectives import OBJECTIVES
from jaxformer.objectives.base import log_z
from jaxformer.parallel import make_mesh, use_mesh, with_shardings
from jaxformer.training.finetune import freeze_plan_for
from jaxformer.training.loop import train
from jaxformer.training.optim import (
    ADAMW, MUON, _muon, decay_mask, make_optimizer, make_schedule, muon_labels,
)
from jaxformer.training.state import create_train_state, init_train_state, state_layout
from jaxformer.training.step import accumulate_gradients, make_train_step, training_loss

CLM = OBJECTIVES["clm"]
register_configs()  # the schemas conf/ composes onto


# -- schedules ------------------------------------------------------------------------------------
LR, END = 2.0, 0.2  # lr and lr * min_lr_ratio; warmup 10 of 110 steps
SCHEDULE_VALUES = {  # step -> closed-form lr
    "constant": {5: 1.0, 10: LR, 60: LR, 109: LR},
    "cosine": {5: 1.0, 10: LR, 60: END + (LR - END) * 0.5 * (1 + math.cos(math.pi * 0.5)),
               110: END},
    "linear": {5: 1.0, 10: LR, 60: LR + (END - LR) * 50 / 100, 110: END},
    "rsqrt": {5: 1.0, 10: LR, 40: LR * math.sqrt(10 / 40), 90: LR * math.sqrt(10 / 90)},
    # decay_fraction 0.2: the last 22 steps decay, from step 88
    "wsd": {5: 1.0, 10: LR, 60: LR, 88: LR, 99: LR + (END - LR) * 11 / 22, 110: END},
}


def lr_at(schedule: str, steps, total: int = 110, **fields) -> list[float]:
    settings = {"lr": LR, "min_lr_ratio": 0.1, "warmup_steps": 10, "decay_fraction": 0.2}
    fn = make_schedule(OptimConfig(schedule=schedule, **{**settings, **fields}), total)
    return [float(fn(step)) for step in steps]


@pytest.mark.parametrize("schedule", SCHEDULE_VALUES)
def test_schedule_matches_its_closed_form(schedule):
    values = SCHEDULE_VALUES[schedule]
    np.testing.assert_allclose(lr_at(schedule, values), list(values.values()), rtol=1e-6)


def test_schedule_edge_cases():
    # rsqrt without a warmup: lr / sqrt(1 + step)
    np.testing.assert_allclose(lr_at("rsqrt", [0, 3, 8], warmup_steps=0), [LR, LR / 2, LR / 3],
                               rtol=1e-6)
    # wsd decaying over every step never starts before the warmup ends: then it is linear
    np.testing.assert_allclose(lr_at("wsd", [10, 60, 110], decay_fraction=1.0),
                               lr_at("linear", [10, 60, 110]), rtol=1e-6)
    # a run shorter than its warmup still ends on the peak, and the decay keeps one step
    assert lr_at("wsd", [4, 5], total=5, warmup_steps=100) == pytest.approx([LR, END])


# -- optimizers on a tiny decoder -----------------------------------------------------------------
@functools.cache
def tiny_decoder():
    """(model config, one fixed batch of 16 addition problems) shared by the tests below."""
    config = tiny_config()
    task = build_task(config.task)
    model_cfg = dataclasses.replace(config.model, vocab_size=task.tokenizer.get_vocab_size())
    return model_cfg, CLM.eval_arrays(task, task.eval_problems()[:16])


@functools.cache
def conf_optim(name: str) -> OptimConfig:
    """conf/optim/NAME.yaml as composed, at its lr from step 0 (no warmup, no decay)."""
    optim = to_train_config(compose_train(f"optim={name}")).optim
    return dataclasses.replace(optim, warmup_steps=0, schedule="constant")


def run_steps(optim: OptimConfig, n_steps: int) -> list[float]:
    """The train losses of n_steps on the same batch."""
    model_cfg, batch = tiny_decoder()
    tx = make_optimizer(optim, 100)
    graphdef, params, rest = split_model(build_model(model_cfg, seed=0))
    state = create_train_state(params, tx, seed=0)
    step = make_train_step(graphdef, rest, tx, make_schedule(optim, 100), CLM)
    losses = []
    for _ in range(n_steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_lowers_the_loss(name):
    losses = run_steps(conf_optim(name), 6)
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_keeps_frozen_groups_and_blocks(name):
    """Under a freeze plan (training/finetune.py) every optimizer leaves the frozen group and the
    frozen lowest block as they were (two updates of fixed, non-zero gradients)."""
    model_cfg, _ = tiny_decoder()
    frozen = FinetuneConfig(freeze=["embeddings"], freeze_lower_blocks=1)
    tx = make_optimizer(conf_optim(name), 100, freeze_plan_for(frozen, model_cfg))
    params = before = model_params()
    grads = jax.tree.map(lambda x: jnp.sin(jnp.arange(x.size, dtype=x.dtype) + 1.0)
                         .reshape(x.shape), params)
    update, opt_state = jax.jit(tx.update), tx.init(params)
    for _ in range(2):
        updates, opt_state = update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    before, after = leaf_names(before), leaf_names(params)
    np.testing.assert_array_equal(before[("embed", "embedding")], after[("embed", "embedding")])
    kernel = ("stack", "blocks", "mlp", "up", "kernel")
    np.testing.assert_array_equal(before[kernel][0], after[kernel][0])  # the frozen lowest block
    assert not np.array_equal(before[kernel][1], after[kernel][1])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_state_lays_out_and_initialises_on_a_mesh(name):
    """The train state as training builds it: shardings from the parameters' logical axes (a
    moment of another rank, Adafactor's row and column statistics, is replicated)."""
    model_cfg, _ = tiny_decoder()
    config = tiny_config()
    mesh = make_mesh(config.mesh)
    with use_mesh(mesh):
        tx = make_optimizer(conf_optim(name), 100)
        layout = state_layout(model_cfg, tx, 0, mesh)
        with_shardings(layout.abstract, layout.shardings)  # the restore target
        state = init_train_state(model_cfg, tx, 0, layout.shardings)
    assert jax.tree.structure(state) == jax.tree.structure(layout.abstract)


def model_params():
    model_cfg, _ = tiny_decoder()
    return nnx.state(build_model(model_cfg, seed=0), nnx.Param)


def leaf_names(tree) -> dict[tuple, object]:
    return {tuple(e.key for e in path if isinstance(e, jax.tree_util.DictKey)): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_decay_embeddings_false_masks_exactly_the_embeddings():
    params = model_params()
    with_embeddings = leaf_names(decay_mask(params))
    without = leaf_names(decay_mask(params, decay_embeddings=False))
    changed = {names for names in with_embeddings if with_embeddings[names] != without[names]}
    assert changed == {("embed", "embedding"), ("embeddings", "positions", "embedding")}
    assert all(with_embeddings[names] for names in changed)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_weight_decay_reaches_the_optimizer_through_the_mask(name):
    """With zero gradients only weight decay moves a parameter: the kernels, and the embeddings
    only while decay_embeddings is on; biases and norm scales never."""
    params = model_params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    for decay_embeddings in (True, False):
        optim = OptimConfig(name=name, lr=0.1, weight_decay=0.5, warmup_steps=0,
                            schedule="constant", decay_embeddings=decay_embeddings)
        tx = make_optimizer(optim, 10)
        updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
        moved = {names: bool(np.any(np.asarray(u) != 0))
                 for names, u in leaf_names(updates).items()}
        assert moved[("stack", "blocks", "mlp", "up", "kernel")]
        assert moved[("embed", "embedding")] == decay_embeddings
        assert not moved[("stack", "blocks", "mlp", "up", "bias")]
        assert not moved[("final_norm", "scale")]


def test_muon_orthogonalises_each_layer_and_leaves_the_rest_to_adamw():
    labels = leaf_names(muon_labels(model_params()))
    assert labels[("stack", "blocks", "attention", "query", "kernel")] == MUON
    assert labels[("stack", "blocks", "mlp", "down", "kernel")] == MUON
    for names in (("embed", "embedding"), ("stack", "blocks", "mlp", "up", "bias"),
                  ("stack", "blocks", "mlp_branch", "norm", "scale"), ("final_norm", "scale")):
        assert labels[names] == ADAMW
    # a stacked kernel's update, layer by layer, is optax's Muon of that layer's 2-D matrix
    optim = OptimConfig(name="muon", lr=0.1, weight_decay=0.0, momentum=0.95)
    grads_lio = jax.random.normal(jax.random.key(0), (2, 16, 32))
    stacked = {"stack": {"blocks": {"mlp": {"up": {"kernel": grads_lio}}}}}
    tx = _muon(optim, optax.constant_schedule(0.1), None)
    update_lio = tx.update(stacked, tx.init(stacked), stacked)[0]["stack"]["blocks"]["mlp"]["up"]
    for layer in range(2):
        alone = optax.contrib.muon(0.1, beta=0.95, nesterov=False, consistent_rms=0.2)
        matrix = {"w": grads_lio[layer]}
        expected = alone.update(matrix, alone.init(matrix), matrix)[0]["w"]
        np.testing.assert_allclose(update_lio["kernel"][layer], expected, rtol=1e-5, atol=1e-7)


# -- z-loss ---------------------------------------------------------------------------------------
@functools.cache
def loss_and_grads(z_loss: float, grad_accum: int = 1):
    model_cfg, batch = tiny_decoder()
    graphdef, params, rest = split_model(build_model(model_cfg, seed=0))
    key = jax.random.key(0)

    def loss_fn(params, batch, key):
        return training_loss(nnx.merge(graphdef, params, rest), batch, CLM, key, z_loss)
    means = ("loss", "accuracy", "z_loss") if z_loss else ("loss", "accuracy")
    grads, metrics = jax.jit(accumulate_gradients, static_argnums=(0, 3, 5))(
        loss_fn, params, batch, grad_accum, key, means)
    return graphdef, params, rest, grads, jax.device_get(metrics)


def test_z_loss_adds_the_mean_squared_log_partition_function():
    graphdef, params, rest, plain_grads, plain = loss_and_grads(0.0)
    _, _, _, grads, metrics = loss_and_grads(1e-2)
    assert "z_loss" not in plain
    assert metrics["loss"] == plain["loss"]  # the reported loss stays the cross-entropy
    # z_loss = 1e-2 x mean over the predicted tokens of (log sum exp logits)^2
    _, batch = tiny_decoder()
    model = nnx.merge(graphdef, params, rest)
    logits_btv = model(jnp.asarray(batch["tokens"][:, :-1]))
    weights_bt = batch["loss_mask"][:, 1:]
    expected = 1e-2 * float((log_z(logits_btv) ** 2 * weights_bt).sum() / weights_bt.sum())
    assert float(metrics["z_loss"]) == pytest.approx(expected, rel=1e-5)
    assert expected > 0
    differ = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(plain_grads),
                                                    jax.tree.leaves(grads))]
    assert any(differ)
    # without the z-loss the differentiated loss is the objective's own loss, bit for bit
    loss, _ = training_loss(model, batch, CLM, jax.random.key(0))
    assert float(loss) == float(CLM.loss(model, batch, deterministic=False,
                                         rngs=nnx.Rngs(dropout=jax.random.key(0)))[0])


def test_z_loss_accumulates_over_micro_batches_weighted_by_tokens():
    *_, grads, metrics = loss_and_grads(1e-2)
    *_, accumulated, accumulated_metrics = loss_and_grads(1e-2, grad_accum=4)
    for key in ("loss", "z_loss", "count"):
        assert float(accumulated_metrics[key]) == pytest.approx(float(metrics[key]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(accumulated)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_z_loss_reaches_the_train_records(tmp_path):
    config = replace(tiny_config(steps=2, eval_every=2, checkpoint_every=2, num_samples=0),
                     optim={"z_loss": 1e-3})
    train(config, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    assert len(train_records) == 2 and all(r["z_loss"] > 0 for r in train_records)
    evals = [r for r in records if r["split"] == "eval"]
    assert evals and "z_loss" not in evals[0] and "log_z_sq" not in evals[0]


# -- bad values -----------------------------------------------------------------------------------
BAD = {
    "wsd decay fraction 0": ({"decay_fraction": 0.0}, "optim.decay_fraction=0.0 must be in (0, 1]"),
    "wsd decay fraction 1.5": ({"decay_fraction": 1.5}, "optim.decay_fraction=1.5 must be in (0, 1]"),
    "unknown optimizer": ({"name": "adam"}, "optim.name='adam' is not one of adamw, sgd, adafactor"),
    "unknown schedule": ({"schedule": "step"}, "optim.schedule='step' is not one of cosine"),
    "negative z-loss": ({"z_loss": -0.1}, "optim.z_loss=-0.1 must be >= 0"),
}


@pytest.mark.parametrize("fields, message", BAD.values(), ids=BAD.keys())
def test_bad_optim_values_are_one_line(fields, message):
    with pytest.raises(UserError) as raised:
        OptimConfig(**fields)
    assert message in str(raised.value) and "\n" not in str(raised.value)
