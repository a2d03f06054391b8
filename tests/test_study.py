"""Study A plumbing: experiment and arch configs, the grids sweeper, new config keys and their
errors, the plain MLP on the teacher task, SGD, and the analysis script on real tiny runs."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from omegaconf import OmegaConf

from helpers import REPO, compose_train, load_script, replace, run_module, tiny_config
from jaxformer.config import (
    LoggerConfig, ModelConfig, OptimConfig, TaskConfig, TrainConfig, TrainerConfig, WandbConfig,
    to_train_config,
)
from jaxformer.errors import UserError
from jaxformer.models import build_model, resolve_model_config
from jaxformer.runs import RunDir
from jaxformer.training.loop import train
from jaxformer.training.optim import make_optimizer

STUDY = REPO / "experiments" / "sigmoid_vs_relu_depth"


def load_analysis():
    return load_script(STUDY / "analyze.py", "study_a_analyze")


def grids_sweeper(*args):
    """A GridsSweeper, imported after Hydra's plugin scan (which re-executes plugin modules in
    place, rebinding the BasicSweeper that an earlier import would have subclassed)."""
    Plugins.instance()
    module = importlib.import_module("hydra_plugins.jaxformer_grids_sweeper.grids_sweeper")
    return module.GridsSweeper(None, *args)


def mlp_train_config(**model) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(**{"kind": "mlp", "residual": False, "norm": "none", "d_model": 16,
                             "n_layers": 2, **model}),
        task=TaskConfig(name="teacher", eval_size=64),
        optim=OptimConfig(lr=3e-3, warmup_steps=0, schedule="constant"),
        trainer=TrainerConfig(steps=80, batch_size=64, log_every=5, eval_every=80,
                              checkpoint_every=80, eval_batch_size=32, progress=False,
                              diagnostics_every=40),
        logger=LoggerConfig(wandb=WandbConfig(mode="disabled")),
    )


# -- configs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, kind, task, residual, norm", [
    ("plain_mlp", "mlp", "teacher", False, "none"),
    ("transformer_preln", "encoder", "is_sorted", True, "pre"),
    ("transformer_noresidual", "encoder", "is_sorted", False, "pre"),
    ("transformer_postln", "encoder", "is_sorted", True, "post"),
    ("transformer_plain", "encoder", "is_sorted", False, "none"),
])
def test_arch_configs_pair_a_family_with_its_task(arch, kind, task, residual, norm):
    typed = to_train_config(compose_train(f"arch={arch}"))
    assert (typed.model.kind, typed.task.name, typed.model.residual, typed.model.norm) == \
        (kind, task, residual, norm)


def sweep_jobs(experiment: str, *command_line: str) -> list[list[str]]:
    """The jobs `-m experiment=NAME` launches, as the sweeper lists them."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        composed = compose(config_name="train", overrides=[f"experiment={experiment}"],
                           return_hydra_config=True)
    sweeper_cfg = composed.hydra.sweeper
    sweeper = grids_sweeper(OmegaConf.to_container(sweeper_cfg.params),
                            OmegaConf.to_container(sweeper_cfg.grids))
    params = [f"{k}={v}" for k, v in sweeper.params.items()]
    overrides = OverridesParser.create().parse_overrides(params + list(command_line))
    return [job for batch in sweeper.split_arguments(overrides, None) for job in batch]


def test_cpu_grid_covers_the_mlp_fully_and_a_reduced_transformer_set():
    jobs = sweep_jobs("sigmoid_vs_relu_depth_cpu")
    mlp = [job for job in jobs if "arch=plain_mlp" in job]
    assert len(jobs) == 90 and len(mlp) == 60
    assert {tuple(sorted(j for j in job if j.startswith(("model.activation", "model.n_layers"))))
            for job in mlp} == {(f"model.activation={a}", f"model.n_layers={d}")
                                for a in ("sigmoid", "relu", "gelu") for d in (2, 4, 8, 16, 32)}
    assert {"model.init=xavier", "model.init=he", "optim=sgd", "optim=adamw"} <= {j for job in mlp for j in job}
    transformers = [job for job in jobs if "arch=plain_mlp" not in job]
    assert all("optim=adamw" in job and "trainer.steps=300" in job for job in transformers)


def test_full_grid_has_every_arm_init_optimizer_and_seed():
    jobs = sweep_jobs("sigmoid_vs_relu_depth")
    assert len(jobs) == 5 * 3 * 5 * 2 * 2 * 3
    assert {j for job in jobs for j in job if j.startswith("arch=")} == {
        "arch=plain_mlp", "arch=transformer_preln", "arch=transformer_noresidual",
        "arch=transformer_postln", "arch=transformer_plain"}


def test_grids_sweeper_precedence_params_then_arm_then_command_line():
    sweeper = grids_sweeper({"a": "1,2", "b": "0"}, [{"c": "x"}, {"a": "3", "c": "y,z"}])
    overrides = OverridesParser.create().parse_overrides(["a=1,2", "b=0", "b=9"])
    jobs = [job for batch in sweeper.split_arguments(overrides, 2) for job in batch]
    assert jobs == [["a=1", "b=9", "c=x"], ["a=2", "b=9", "c=x"],
                    ["a=3", "b=9", "c=y"], ["a=3", "b=9", "c=z"]]
    assert len(sweeper.split_arguments(overrides, 3)) == 2  # max_batch_size still batches


@pytest.mark.parametrize("make, message", [
    (lambda: TrainerConfig(diagnostics_every=-1), "trainer.diagnostics_every=-1 must be >= 0"),
    (lambda: OptimConfig(name="rmsprop"), "optim.name='rmsprop' is not one of adamw, sgd"),
    (lambda: OptimConfig(name="sgd", momentum=1.0), "optim.momentum=1.0 must be in [0, 1)"),
    (lambda: TaskConfig(name="teacher", num_classes=1), "task.num_classes=1 must be at least 2"),
    (lambda: TaskConfig(name="teacher", input_dim=0), "task.input_dim=0 must be a positive number"),
    (lambda: ModelConfig(kind="mlp"), "model.kind=mlp is a plain MLP (model.residual=True"),
    (lambda: ModelConfig(kind="mlp", residual=False, norm="none", input_dim=-2),
     "model.input_dim=-2 must be a positive number"),
    (lambda: replace(tiny_config(), model={"kind": "mlp", "residual": False, "norm": "none"}),
     "model.kind=mlp reads feature vectors, not task.name='addition'"),
    (lambda: replace(tiny_config(), task={"name": "teacher"}),
     "task.name='teacher' gives feature vectors, which model.kind=decoder cannot read"),
])
def test_bad_study_values_are_one_line_errors(make, message):
    with pytest.raises(UserError) as err:
        make()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_input_dim_that_disagrees_with_the_task_is_refused():
    with pytest.raises(UserError, match="model.input_dim=8 but the task gives 16 features"):
        resolve_model_config(ModelConfig(kind="mlp", residual=False, norm="none", input_dim=8),
                             None, 4, 16)


def test_cli_mlp_on_a_token_task_is_one_line():
    proc = run_module("jaxformer.train", "model=mlp")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: model.kind=mlp reads feature vectors, not task.name='addition': "
        "use a vector task (teacher)"]


# -- the model, the task, the optimizer ------------------------------------------------------------
def test_mlp_stacks_its_hidden_layers_and_scan_equals_unrolled():
    cfg = resolve_model_config(ModelConfig(kind="mlp", residual=False, norm="none", d_model=8,
                                           n_layers=5), None, 3, 4)
    features = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    scanned = build_model(cfg, 0)
    unrolled = build_model(resolve_model_config(
        ModelConfig(kind="mlp", residual=False, norm="none", d_model=8, n_layers=5,
                    scan_layers=False), None, 3, 4), 0)
    assert scanned.stack.blocks.dense.kernel.shape == (5, 8, 8)
    assert scanned(features).shape == (6, 3)
    np.testing.assert_allclose(scanned(features), unrolled(features), rtol=1e-6)


def test_plain_sgd_steps_against_the_gradient():
    optim = OptimConfig(name="sgd", lr=0.5, momentum=0.0, clip_norm=0.0, warmup_steps=0,
                        schedule="constant", weight_decay=0.0)
    tx = make_optimizer(optim, 10)
    params = {"w": np.ones(3, np.float32)}
    grads = {"w": np.array([1.0, -2.0, 0.5], np.float32)}
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(optax.apply_updates(params, updates)["w"], [0.5, 2.0, 0.75])
    momentum = make_optimizer(replace(tiny_config(), optim={"name": "sgd", "momentum": 0.9}).optim, 10)
    assert len(jax.tree.leaves(momentum.init(params))) > len(jax.tree.leaves(tx.init(params)))


def test_mlp_learns_the_teacher_task_with_sgd_and_adamw(tmp_path):
    for name, lr, accuracy in (("adamw", 3e-3, 0.6), ("sgd", 0.05, 0.3)):  # chance: 0.25
        config = replace(mlp_train_config(activation="relu", init="he", d_model=32),
                         optim={"name": name, "lr": lr})
        result = train(config, tmp_path / name)
        losses = [record["loss"] for record in RunDir(tmp_path / name).metrics("train")]
        assert result.objective == "vector_classification" and result.step == 80
        assert losses[-1] < 0.85 * losses[0] and result.eval_metrics["accuracy"] > accuracy
        assert not (tmp_path / name / "tokenizer.json").exists()


# -- the analysis script ---------------------------------------------------------------------------
def fake_hydra_run(run_dir: Path, config: TrainConfig) -> None:
    """What Hydra adds around train(): the composed config in .hydra/config.yaml."""
    train(config, run_dir)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.structured(config), run_dir / ".hydra" / "config.yaml")


def test_analysis_writes_tables_and_plots_from_real_runs(tmp_path):
    sweep = tmp_path / "sweep"
    for i, (activation, init, depth) in enumerate([("sigmoid", "xavier", 2), ("sigmoid", "xavier", 6),
                                                  ("relu", "he", 2), ("relu", "he", 6)]):
        config = mlp_train_config(activation=activation, init=init, n_layers=depth, d_model=32)
        fake_hydra_run(sweep / str(i), replace(config, trainer={"steps": 20, "eval_every": 20}))
    out = tmp_path / "results"
    load_analysis().main([str(sweep), "--out", str(out)])
    for name in ("runs.csv", "summary.md", "grad_vs_layer_init.png", "act_grad_vs_layer_init.png",
                 "grad_vs_layer_end.png", "ratio_vs_depth.png", "loss_curves.png",
                 "final_loss_heatmap.png"):
        assert (out / name).stat().st_size > 0, name
    summary = (out / "summary.md").read_text()
    assert "- PASS: plain MLP, sigmoid, xavier init" in summary
    assert "- PASS: plain MLP, relu, he init" in summary
    rows = (out / "runs.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("arch,init,optimizer,activation,depth")


def test_analysis_refuses_runs_without_diagnostics(tmp_path):
    fake_hydra_run(tmp_path / "0", replace(mlp_train_config(), trainer={
        "steps": 2, "eval_every": 2, "diagnostics_every": 0}))
    with pytest.raises(SystemExit, match="no runs with diagnostics"):
        load_analysis().main([str(tmp_path), "--out", str(tmp_path / "out")])


def test_wandb_history_rows_become_metrics_records():
    rows = [{"_step": 0, "diagnostics/grad_norm/layer_00": 2.0, "diagnostics/grad_ratio": 0.5,
             "train/loss": None},
            {"_step": 5, "train/loss": 1.2, "eval/loss": 1.3}]
    assert load_analysis().wandb_records(rows) == [
        {"step": 0, "split": "diagnostics", "grad_norm/layer_00": 2.0, "grad_ratio": 0.5},
        {"step": 5, "split": "train", "loss": 1.2}, {"step": 5, "split": "eval", "loss": 1.3}]
