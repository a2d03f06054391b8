"""Study C (experiments/modifications): the experiment grids, the analysis' pure functions (arm
names, lr sensitivity, best lr, paired interval) on synthetic numbers, and analyze.py end to end
on synthesized run dirs and on a real tiny run."""

from __future__ import annotations

import csv
import importlib
import importlib.util
import json
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from omegaconf import OmegaConf

from helpers import REPO, compose_train, load_script, replace, tiny_config, write_corpus
from jaxformer.config import register_configs, to_dict, to_train_config
from jaxformer.training.loop import train

register_configs()
STUDY = REPO / "experiments" / "modifications"
ARMS = ["baseline", "swiglu", "geglu", "rmsnorm", "rope", "qk_norm", "z_loss", "no_bias",
        "untied", "all"]


def load_analysis():
    return load_script(STUDY / "analyze.py", "study_c_analyze")


analysis = load_analysis()


def sweep_jobs(*overrides: str) -> list[list[str]]:
    """The jobs `-m overrides...` launches, as the grids sweeper lists them."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        composed = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    Plugins.instance()  # before the import: the plugin scan re-executes plugin modules
    module = importlib.import_module("hydra_plugins.jaxformer_grids_sweeper.grids_sweeper")
    sweeper_cfg = composed.hydra.sweeper
    sweeper = module.GridsSweeper(None, OmegaConf.to_container(sweeper_cfg.params),
                                  OmegaConf.to_container(sweeper_cfg.grids))
    params = [f"{k}={v}" for k, v in sweeper.params.items()]
    parsed = OverridesParser.create().parse_overrides(params)
    return [job for batch in sweeper.split_arguments(parsed, None) for job in batch]


def job_arm(experiment: str, job: list[str]) -> str:
    config = to_dict(to_train_config(compose_train(f"experiment={experiment}", *job)))
    return analysis.arm_name(config["model"], config["optim"])


# -- the experiment grids --------------------------------------------------------------------------
@pytest.mark.parametrize("experiment, n_lrs, n_seeds", [("modifications_cpu", 4, 3),
                                                         ("modifications_gpu", 6, 5)])
def test_grid_is_every_arm_at_every_lr_and_seed(experiment, n_lrs, n_seeds):
    jobs = sweep_jobs(f"experiment={experiment}")
    assert len(jobs) == len(ARMS) * n_lrs * n_seeds
    per_arm = n_lrs * n_seeds
    arms = [job_arm(experiment, jobs[i]) for i in range(0, len(jobs), per_arm)]
    assert arms == ARMS
    lrs = sorted({float(o.split("=")[1]) for job in jobs for o in job if o.startswith("optim.lr=")})
    assert len(lrs) == n_lrs and all(b / a > 1.5 for a, b in zip(lrs, lrs[1:]))


def test_gated_arms_are_parameter_matched_and_all_keeps_full_attention_heads():
    config = to_train_config(compose_train("experiment=modifications_cpu", "model.mlp=glu"))
    assert config.model.glu_param_matched and config.model.n_kv_heads is None


def test_the_grid_narrows_from_the_command_line():
    jobs = sweep_jobs("experiment=modifications_cpu", "hydra.sweeper.grids=[{},{model.positions:rope}]",
                      "hydra.sweeper.params={optim.lr:'0.01',seed:'0'}")
    assert [job_arm("modifications_cpu", job) for job in jobs] == ["baseline", "rope"]


# -- arm names ---------------------------------------------------------------------------------------
BASE = {"mlp": "dense", "activation": "gelu", "norm_type": "layernorm", "positions": "learned",
        "qk_norm": False, "bias": True, "tie_embeddings": True, "n_kv_heads": None}


@pytest.mark.parametrize("model, z_loss, name", [
    ({}, 0.0, "baseline"),
    ({"mlp": "glu", "activation": "silu"}, 0.0, "swiglu"),
    ({"mlp": "glu"}, 0.0, "geglu"),
    ({"norm_type": "rmsnorm"}, 0.0, "rmsnorm"),
    ({"qk_norm": True}, 0.0, "qk_norm"),
    ({}, 1e-4, "z_loss"),
    ({"bias": False, "tie_embeddings": False}, 0.0, "no_bias+untied"),
    ({"activation": "relu"}, 0.0, "mlp=dense,activation=relu"),
    ({"mlp": "glu", "activation": "silu", "norm_type": "rmsnorm", "positions": "rope",
      "qk_norm": True, "bias": False, "tie_embeddings": False}, 1e-4, "all"),
    ({"mlp": "glu", "activation": "silu", "norm_type": "rmsnorm", "positions": "rope",
      "bias": False, "tie_embeddings": False, "n_kv_heads": 2}, 0.0,
     "swiglu+rmsnorm+rope+no_bias+untied+n_kv_heads=2"),
])
def test_arm_name_is_the_switches_that_differ_from_the_baseline(model, z_loss, name):
    assert analysis.arm_name({**BASE, **model}, {"z_loss": z_loss}) == name


# -- the statistics ----------------------------------------------------------------------------------
def test_lr_sensitivity_is_the_mean_capped_loss_minus_the_best():
    losses = {1e-3: 2.0, 3e-3: 1.5, 1e-2: 1.6, 3e-2: float("nan")}  # nan: diverged, counts as L0
    assert analysis.lr_sensitivity(losses, cap=3.0) == pytest.approx((2.0 + 1.5 + 1.6 + 3.0) / 4 - 1.5)
    assert analysis.lr_sensitivity({1e-3: 9.0, 1e-2: 1.0}, cap=3.0) == pytest.approx(1.0)  # capped
    assert analysis.lr_sensitivity({1e-3: 1.2, 1e-2: 1.2}, cap=3.0) == 0.0
    assert math.isnan(analysis.lr_sensitivity({}, cap=3.0))


def test_best_lr_is_the_lowest_finite_loss_ties_to_the_smaller_lr():
    assert analysis.best_lr({1e-3: 2.0, 3e-3: 1.4, 1e-2: float("nan")}) == 3e-3
    assert analysis.best_lr({3e-3: 1.4, 1e-3: 1.4}) == 1e-3
    assert math.isnan(analysis.best_lr({1e-3: float("nan")}))


def test_paired_interval_is_a_t_interval_over_seed_differences():
    arm = {0: 1.0, 1: 1.2, 2: 0.9, 3: 5.0}  # seed 3 has no baseline: not paired
    base = {0: 1.1, 1: 1.25, 2: 1.05}
    mean, low, high, n = analysis.paired_interval(arm, base)
    diffs = [-0.1, -0.05, -0.15]
    sd = (sum((d - sum(diffs) / 3) ** 2 for d in diffs) / 2) ** 0.5
    half = 4.302652729911275 * sd / 3 ** 0.5  # t_{0.975, 2}
    assert n == 3 and mean == pytest.approx(-0.1)
    assert (low, high) == (pytest.approx(-0.1 - half), pytest.approx(-0.1 + half))
    mean, low, high, n = analysis.paired_interval({0: 1.0}, {0: 1.5})
    assert (mean, n) == (-0.5, 1) and math.isnan(low) and math.isnan(high)


# -- the analysis script, end to end ---------------------------------------------------------------
def synth_run(sweep: Path, name: str, overrides: list[str], finals: list[float], steps: int = 100,
              diverge: bool = False, stop: int | None = None) -> None:
    """A run dir as the sweep leaves it: the composed config and metrics.jsonl with train records
    every 10 steps and evals at `finals`' steps (2 bytes a token, a vocabulary of 256: the loss
    at init is 4 bits per byte); `stop`: killed at that step."""
    config = to_train_config(compose_train("experiment=modifications_cpu", f"trainer.steps={steps}",
                                           "model.vocab_size=256", *overrides))
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.structured(config), run / ".hydra" / "config.yaml")
    records = [{"step": s, "split": "train", "loss": 5.0 - s / 50, "tokens_per_s": 1000.0 + s}
               for s in range(10, (stop or steps) + 1, 10)]
    if diverge:
        records[-1]["loss"] = float("nan")
    records += [{"step": (stop or steps) * (i + 1) // len(finals), "split": "eval", "loss": 2 * math.log(2) * bpb,
                 "bpb": bpb, "unigram_bpb": 4.0, "zlib_bpb": 3.0} for i, bpb in enumerate(finals)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_analysis_of_a_synthesized_sweep(tmp_path):
    sweep, out = tmp_path / "sweep", tmp_path / "results"
    # baseline best at lr 1e-2 (1.50, 1.52, 1.54), swiglu best at 1e-2 (1.40, 1.44, 1.46): the
    # paired differences -0.10, -0.08, -0.08
    bpbs = {("baseline", 1e-3): [1.8, 1.82, 1.84], ("baseline", 1e-2): [1.5, 1.52, 1.54],
            ("swiglu", 1e-3): [1.7, 1.72, 1.74], ("swiglu", 1e-2): [1.4, 1.44, 1.46]}
    overrides = {"baseline": [], "swiglu": ["model.mlp=glu", "model.activation=silu"]}
    for (arm, lr), values in bpbs.items():
        for seed, bpb in enumerate(values):
            name = f"{arm}-{lr}-{seed}"
            synth_run(sweep, name, overrides[arm] + [f"optim.lr={lr}", f"seed={seed}"], [bpb + 0.3, bpb])
    synth_run(sweep, "swiglu-0.1-0", overrides["swiglu"] + ["optim.lr=0.1", "seed=0"], [2.0],
              diverge=True)
    synth_run(sweep, "swiglu-0.1-1", overrides["swiglu"] + ["optim.lr=0.1", "seed=1"], [9.0])
    synth_run(sweep, "baseline-0.1-0", ["optim.lr=0.1", "seed=0"], [2.5, 2.0])
    synth_run(sweep, "baseline-0.1-1", ["optim.lr=0.1", "seed=1"], [2.5], stop=50)  # partial
    # missing: baseline 0.1 seed 2, swiglu 0.1 seed 2
    analysis.main([str(sweep), "--out", str(out)])
    for name in ("runs.csv", "summary.md", "bpb_vs_lr.png", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert len(rows) == 16
    status = {(r["arm"], float(r["lr"]), int(r["seed"])): r["status"] for r in rows}
    assert status[("swiglu", 0.1, 0)] == "diverged"  # a nan train loss
    assert status[("swiglu", 0.1, 1)] == "diverged"  # bpb 9 above L0 = log2(256) / 2 = 4
    assert status[("baseline", 0.1, 1)] == "partial"
    assert float(rows[0]["init_bpb"]) == pytest.approx(4.0)
    summary = (out / "summary.md").read_text()
    assert "| swiglu | " in summary and "| 0.01 | 1.4333 ± 0.0306 (3) |" in summary
    mean, low, high, n = analysis.paired_interval({0: 1.4, 1: 1.44, 2: 1.46}, {0: 1.5, 1: 1.52, 2: 1.54})
    assert n == 3 and f"{mean:+.4f} [{low:+.4f}, {high:+.4f}] (3)" == "-0.0867 [-0.1154, -0.0580] (3)"
    assert "-0.0867 [-0.1154, -0.0580] (3)" in summary
    # baseline sensitivity: only seed 0 has every lr (seed 1 is partial at 0.1, seed 2 missing):
    # mean(1.8, 1.5, 2.0) - 1.5
    assert "| 0.2667 ± 0.0000 (1) |" in summary
    # swiglu, diverged runs at L0 = 4: seed 0 mean(1.7, 1.4, 4) - 1.4, seed 1 mean(1.72, 1.44, 4) - 1.44
    assert "| 0.9567 ± 0.0141 (2) |" in summary
    assert "- partial (no eval at step 100; last step 50): baseline lr 0.1 seed 1" in summary
    assert "- missing: baseline lr 0.1 seed 2" in summary and "- missing: swiglu lr 0.1 seed 2" in summary


def test_analysis_reads_a_real_tiny_run(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", ["def f(x):\n    return x + 1\n"] * 60,
                          ["class A:\n    pass\n"] * 10)
    sweep = tmp_path / "sweep"
    config = replace(tiny_config(steps=4, eval_every=2, checkpoint_every=4, num_samples=0),
                     model={"max_len": 32, "norm_type": "rmsnorm"},
                     task={"name": "text", "data_dir": str(corpus), "seq_len": 32, "eval_size": 8})
    run = sweep / "rms"
    train(config, run)
    (run / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.structured(config), run / ".hydra" / "config.yaml")
    out = tmp_path / "results"
    analysis.main([str(sweep), "--out", str(out)])
    (row,) = csv.DictReader((out / "runs.csv").open())
    assert (row["arm"], row["status"], row["last_step"]) == ("rmsnorm", "finished", "4")
    vocab = json.loads((corpus / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "eval"]
    assert float(row["bpb"]) == pytest.approx(evals[-1]["bpb"])
    assert float(row["init_bpb"]) == pytest.approx(math.log(vocab) * evals[-1]["bpb"] / evals[-1]["loss"])
    assert float(row["n_params"]) > 0 and float(row["tokens_per_s"]) > 0
    assert (out / "curves.png").stat().st_size > 0


def test_analysis_refuses_an_empty_dir(tmp_path):
    with pytest.raises(SystemExit, match="no run dirs"):
        analysis.main([str(tmp_path), "--out", str(tmp_path / "out")])



def test_a_spike_is_a_loss_well_above_the_recent_median_not_a_noisy_batch():
    losses = [7.8, 6.5, 6.3, 5.9, 6.0, 5.9, 5.5, 5.6, 5.3, 5.9, 5.3, 4.5, 5.7, 5.1, 8.0, 5.2]
    run = analysis.Run("x", "baseline", 1e-3, 0, 160, 1024, 256,
                       train=[{"step": 10 * (i + 1), "loss": x} for i, x in enumerate(losses)])
    assert analysis.count_spikes(run) == 1  # 8.0 only; 5.7 after a lucky 4.5 is noise
