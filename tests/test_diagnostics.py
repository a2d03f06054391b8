"""Per-layer diagnostics: numbers checked against direct jax.grad computations and by hand, on the
plain MLP and on every transformer family, and the sigmoid-vs-relu sanity at initialisation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import replace, tiny_config
from jaxformer.config import ModelConfig, OptimConfig
from jaxformer.models import build_model, resolve_model_config, split_model
from jaxformer.models.layers import ACTIVATION_FNS
from jaxformer.models.probes import activation_stats
from jaxformer.objectives import OBJECTIVES
from jaxformer.runs import RunDir
from jaxformer.training.diagnostics import diagnostics_metrics, make_diagnostics
from jaxformer.training.loop import train
from jaxformer.training.optim import make_optimizer, make_schedule
from jaxformer.training.state import create_train_state
from jaxformer.training.step import make_train_step

PLAIN_SGD = OptimConfig(name="sgd", lr=0.1, momentum=0.0, clip_norm=0.0, warmup_steps=0,
                        schedule="constant", weight_decay=0.0)


def mlp_config(**fields) -> ModelConfig:
    base = dict(kind="mlp", residual=False, norm="none", d_model=8, n_layers=3,
                activation="sigmoid", init="xavier")
    return resolve_model_config(ModelConfig(**{**base, **fields}), None, 3, 5)


def setup(model_cfg: ModelConfig, optim: OptimConfig = PLAIN_SGD):
    graphdef, params, rest = split_model(build_model(model_cfg, 0))
    tx = make_optimizer(optim, 10)
    return graphdef, rest, tx, create_train_state(params, tx, 0), make_schedule(optim, 10)


def vector_batch(n: int = 6, input_dim: int = 5, classes: int = 3) -> dict:
    rng = np.random.default_rng(0)
    return {"features": rng.standard_normal((n, input_dim)).astype(np.float32),
            "label": rng.integers(0, classes, n).astype(np.int32)}


def diagnose(graphdef, rest, tx, state, batch, objective="vector_classification") -> dict:
    diagnostics = make_diagnostics(graphdef, rest, tx, OBJECTIVES[objective])
    return diagnostics_metrics(diagnostics(state, batch))


def per_layer(metrics: dict, stat: str, prefix: str = "") -> np.ndarray:
    keys = sorted(k for k in metrics if k.startswith(f"{stat}/{prefix}layer_"))
    return np.array([metrics[k] for k in keys])


# -- against an explicit, unrolled computation ----------------------------------------------------
class ExplicitMLP:
    """The plain MLP written out from its parameters, with a loss that can start at any layer."""

    def __init__(self, params: dict, cfg: ModelConfig):
        self.params, self.cfg = params, cfg
        self.act = ACTIVATION_FNS[cfg.activation]

    def layer(self, params, l, h):
        dense = params["stack"]["blocks"]["dense"]
        return self.act(h @ dense["kernel"][l] + dense["bias"][l])

    def outputs(self, features) -> list:
        h = features @ self.params["input"]["kernel"] + self.params["input"]["bias"]
        outputs = []
        for l in range(self.cfg.n_layers):
            outputs.append(h := self.layer(self.params, l, h))
        return outputs

    def loss_from(self, l, h_l, labels, params=None):
        """The loss as a function of layer l's output (l = -1: of the input projection's)."""
        params = params or self.params
        for k in range(l + 1, self.cfg.n_layers):
            h_l = self.layer(params, k, h_l)
        logits = h_l @ params["head"]["kernel"] + params["head"]["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def loss(self, params, features, labels):
        h = features @ params["input"]["kernel"] + params["input"]["bias"]
        return self.loss_from(-1, h, labels, params)


def layer_norms(tree, n_layers) -> np.ndarray:
    dense = tree["stack"]["blocks"]["dense"]
    return np.array([np.sqrt(np.sum(dense["kernel"][l] ** 2) + np.sum(dense["bias"][l] ** 2))
                     for l in range(n_layers)])


@pytest.mark.parametrize("scan", [True, False])
def test_mlp_diagnostics_equal_explicit_gradients(scan):
    cfg = mlp_config(scan_layers=scan)
    graphdef, rest, tx, state, _ = setup(cfg)
    batch = vector_batch()
    metrics = diagnose(graphdef, rest, tx, state, batch)

    params = state.params.to_pure_dict()
    net = ExplicitMLP(params, cfg)
    outputs = net.outputs(batch["features"])
    act_grads = [np.linalg.norm(jax.grad(net.loss_from, argnums=1)(l, h, batch["label"]))
                 for l, h in enumerate(outputs)]
    np.testing.assert_allclose(per_layer(metrics, "act_grad_norm"), act_grads, rtol=1e-5)
    np.testing.assert_allclose(per_layer(metrics, "act_mean"), [h.mean() for h in outputs], rtol=1e-5)
    np.testing.assert_allclose(per_layer(metrics, "act_std"), [h.std() for h in outputs], rtol=1e-5)
    weight_grads = layer_norms(jax.grad(net.loss)(params, batch["features"], batch["label"]), 3)
    np.testing.assert_allclose(per_layer(metrics, "grad_norm"), weight_grads, rtol=1e-5)
    assert metrics["grad_ratio"] == pytest.approx(weight_grads[0] / weight_grads[-1], rel=1e-5)
    assert metrics["act_grad_ratio"] == pytest.approx(act_grads[0] / act_grads[-1], rel=1e-5)
    # plain SGD at lr 0.1 without clipping: the update is -0.1 x the gradient, layer by layer
    np.testing.assert_allclose(per_layer(metrics, "update_ratio"),
                               0.1 * weight_grads / layer_norms(params, 3), rtol=1e-5)
    assert metrics["loss"] == pytest.approx(float(net.loss(params, batch["features"], batch["label"])),
                                            rel=1e-6)


def test_diagnostics_use_the_train_steps_gradients_with_dropout():
    cfg = replace(tiny_config(), model={"dropout": 0.3}).model
    cfg = resolve_model_config(cfg, 20)
    graphdef, rest, tx, state, schedule = setup(cfg, OptimConfig())
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(5, 20, (4, 9)).astype(np.int32),
             "loss_mask": np.ones((4, 9), np.float32)}
    metrics = diagnose(graphdef, rest, tx, state, batch, "clm")
    _, step_metrics = make_train_step(graphdef, rest, tx, schedule, OBJECTIVES["clm"])(state, batch)
    assert metrics["grad_norm"] == pytest.approx(float(step_metrics["grad_norm"]), rel=1e-5)
    assert metrics["loss"] == pytest.approx(float(step_metrics["loss"]), rel=1e-6)


# -- activation statistics by hand ----------------------------------------------------------------
def stats(pre, activation):
    pre = jnp.asarray(pre, jnp.float32)
    fn = ACTIVATION_FNS[activation]
    return {k: float(v) for k, v in activation_stats(pre, fn(pre), activation, fn).items()}


def test_sigmoid_saturation_counts_outputs_outside_1_to_99_percent():
    # sigmoid: 4.5e-5, 0.269, 0.5, 0.731, 0.99995 -> two of five saturated; none zero or dead
    assert stats([[-10.0, -1.0, 0.0, 1.0, 10.0]], "sigmoid") == {
        "saturated_frac": pytest.approx(0.4), "zero_frac": 0.0, "dead_frac": 0.0}


def test_relu_zero_fraction_and_dead_units():
    pre = [[-1.0, 2.0, -3.0, 0.5],  # 3 examples x 4 units: unit 0 is never active -> dead
           [-2.0, -1.0, 1.0, 0.5],
           [-0.5, 1.0, 1.0, -4.0]]
    assert stats(pre, "relu") == {"saturated_frac": 0.5,  # 6 of 12 outputs are 0
                                  "zero_frac": 0.5, "dead_frac": 0.25}


def test_gelu_saturates_where_its_slope_vanishes():
    # GELU's slope is ~0 far on the negative side and at its minimum near x = -0.75
    assert stats([[-6.0, -0.7518, 0.0, 1.0, 3.0]], "gelu")["saturated_frac"] == pytest.approx(0.4)


# -- every family, several stacks ----------------------------------------------------------------
@pytest.mark.parametrize("kind, objective", [("decoder", "clm"), ("encoder_decoder", "seq2seq")])
def test_transformer_families_get_per_layer_series(kind, objective):
    base = resolve_model_config(replace(tiny_config(), model={"kind": kind, "n_layers": 3}).model, 20)
    rng = np.random.default_rng(0)
    batch = {"clm": {"tokens": rng.integers(5, 20, (4, 9)).astype(np.int32),
                     "loss_mask": np.ones((4, 9), np.float32)},
             "seq2seq": {"src": rng.integers(5, 20, (4, 7)).astype(np.int32),
                         "src_valid": np.ones((4, 7), np.float32),
                         "tgt": rng.integers(5, 20, (4, 6)).astype(np.int32),
                         "loss_mask": np.ones((4, 6), np.float32)}}[objective]
    results = []
    for scan in (True, False):
        graphdef, rest, tx, state, _ = setup(dataclasses.replace(base, scan_layers=scan))
        results.append(diagnose(graphdef, rest, tx, state, batch, objective))
    scanned, unrolled = results
    assert scanned.keys() == unrolled.keys()
    np.testing.assert_allclose([scanned[k] for k in scanned], [unrolled[k] for k in scanned],
                               rtol=1e-4, atol=1e-7)
    prefixes = ["encoder/", "decoder/"] if kind == "encoder_decoder" else [""]
    for prefix in prefixes:
        for stat in ("grad_norm", "act_grad_norm", "act_mean", "act_std", "update_ratio",
                     "saturated_frac", "zero_frac", "dead_frac"):
            values = per_layer(scanned, stat, prefix)
            assert len(values) == 3 and np.isfinite(values).all(), (prefix, stat)
        assert (per_layer(scanned, "grad_norm", prefix) > 0).all()
    ratio_keys = {k for k in scanned if "ratio" in k and "layer_" not in k}
    suffixes = ["/encoder", "/decoder"] if kind == "encoder_decoder" else [""]
    assert ratio_keys == {f"{r}{s}" for r in ("grad_ratio", "act_grad_ratio") for s in suffixes}


# -- the study's sanity, small --------------------------------------------------------------------
def test_sigmoid_gradients_vanish_with_depth_and_relu_he_does_not():
    batch = vector_batch(n=64, input_dim=16, classes=4)
    ratios = {}
    for activation, init in (("sigmoid", "xavier"), ("relu", "he")):
        cfg = resolve_model_config(ModelConfig(kind="mlp", residual=False, norm="none", d_model=64,
                                               n_layers=8, activation=activation, init=init), None, 4, 16)
        graphdef, rest, tx, state, _ = setup(cfg)
        ratios[activation] = diagnose(graphdef, rest, tx, state, batch)["grad_ratio"]
    # sigma' <= 1/4 per layer: 7 layers apart, at most ~0.25^7 = 6e-5 times the Xavier gain
    assert ratios["sigmoid"] < 1e-3
    assert 0.1 < ratios["relu"] < 10


# -- in the loop -----------------------------------------------------------------------------------
def test_training_with_diagnostics_logs_per_layer_records(tmp_path):
    config = replace(tiny_config(steps=5, eval_every=5, checkpoint_every=5, diagnostics_every=2),
                     model={"n_layers": 3})
    train(config, tmp_path)
    records = RunDir(tmp_path).metrics()
    diagnostics = [r for r in records if r["split"] == "diagnostics"]
    assert [r["step"] for r in diagnostics] == [0, 2, 4]  # before the updates 1, 3 and 5
    for stat in ("grad_norm", "act_grad_norm", "act_mean", "act_std", "update_ratio",
                 "saturated_frac", "zero_frac", "dead_frac"):
        assert {f"{stat}/layer_00", f"{stat}/layer_01", f"{stat}/layer_02"} <= set(diagnostics[0])
    assert diagnostics[0]["update_ratio/layer_00"] == 0.0  # lr warms up from 0 at step 0
    assert diagnostics[1]["update_ratio/layer_00"] > 0.0
    # the train step of the same state and batch saw the same loss
    train_loss_1 = next(r["loss"] for r in records if r["split"] == "train" and r["step"] == 1)
    assert diagnostics[0]["loss"] == pytest.approx(train_loss_1, rel=1e-5)


def test_diagnostics_off_by_default_add_nothing(tmp_path):
    train(tiny_config(steps=2, eval_every=2, checkpoint_every=2), tmp_path)
    splits = {record["split"] for record in RunDir(tmp_path).metrics()}
    assert splits == {"train", "eval", "summary"}
