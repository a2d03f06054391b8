"""Study B plumbing: the experiment grids, run.py's resume plan, the FLOPs and iso-accuracy
arithmetic on constructed cases, and the analysis on a small synthetic sweep."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from helpers import REPO, load_script, replace, tiny_config
from jaxformer.config import SamplingConfig, register_configs, to_dict
from jaxformer.data.tasks import build_task
from jaxformer.inference.selection import selection_metrics
from jaxformer.inference.test_time import settings_key

STUDY = REPO / "experiments" / "data_vs_test_time"
register_configs()


def load(name: str):
    """A module of the study folder, imported by path (its siblings import each other)."""
    return load_script(STUDY / f"{name}.py", f"study_b_{name}")


# -- configs and the chained script -----------------------------------------------------------------
def test_grids_are_sizes_times_seeds_in_fixed_named_dirs():
    run = load("run")
    cpu = run.sweep_jobs("data_vs_test_time_cpu", [])
    assert len(cpu) == 14 and {job.steps for job in cpu} == {600}
    assert [job.name for job in cpu[:3]] == ["D200-seed0", "D200-seed1", "D300-seed0"]
    assert {job.run_dir.parent for job in cpu} == {Path("multirun/data_vs_test_time_cpu/sweep")}
    full = run.sweep_overrides("data_vs_test_time", [])
    assert len(full) == 11 * 5 and ["task.train_size=16000", "seed=4"] in full
    assert len(run.evaluation_lines("data_vs_test_time_cpu", None)) == 5


def fake_sweep_dirs(sweep: Path, finished: bool, evaluated: bool) -> None:
    """What training and one 8-sample evaluation leave behind, for run.py's plan (no arrays)."""
    for d in (100, 200):
        run_dir = sweep / f"D{d}-seed0"
        (run_dir / "checkpoints").mkdir(parents=True)
        if finished:
            (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 4, "split": "summary"}) + "\n")
        if evaluated:
            key = settings_key(4, SamplingConfig(num_samples=8), None)
            (run_dir / "test_time" / key).mkdir(parents=True)
            (run_dir / "test_time" / key / "summary.json").write_text("{}")


@pytest.mark.parametrize("finished, evaluated, expect", [
    (True, True, ["[train] all 2 runs finished", "D100-seed0 step4-T1-k0-p1-n8-seed0: done before, "
                  "skipped", "D200-seed0 step4-T1-k0-p1-n8-seed0: done before, skipped"]),
    (False, False, ["[train] 2 of 2 runs to train or resume (D100-seed0, D200-seed0)",
                    "$ python -m jaxformer.train -m experiment=data_vs_test_time_cpu",
                    "[evaluate 2/2] D200-seed0, once trained"]),
    (True, False, ["[train] all 2 runs finished", "[evaluate 1/2] D100-seed0 step4-T1-k0-p1-n8-seed0\n"
                   "  $ python -m jaxformer.evaluate checkpoint="]),
])
def test_run_skips_finished_training_and_evaluations(tmp_path, capsys, finished, evaluated, expect):
    fake_sweep_dirs(tmp_path, finished, evaluated)
    load("run").main(["data_vs_test_time_cpu", "task.train_size=100,200", "seed=0",
                      "trainer.steps=4", f"hydra.sweep.dir={tmp_path}",
                      "--evaluate", "sampling.num_samples=8", "--dry-run"])
    printed = capsys.readouterr().out
    for line in expect:
        assert line in printed


def test_run_refuses_a_timestamped_sweep_dir():
    with pytest.raises(SystemExit, match="timestamped hydra.sweep.dir"):
        load("run").main(["quickstart", "seed=0,1", "--dry-run"])


# -- the arithmetic -------------------------------------------------------------------------------
def test_flops_accounting():
    tradeoff = load("tradeoff")
    assert tradeoff.train_flops(1000, 600 * 64 * 20) == 6 * 1000 * 600 * 64 * 20
    # a 13-token prompt read once, then k samples of 7 tokens each
    assert tradeoff.sample_flops(1000, 13, 7, 1) == 2 * 1000 * 20
    assert tradeoff.sample_flops(1000, 13, 7, 128) == 2 * 1000 * (13 + 128 * 7)


def test_k_to_reach_interpolates_in_log_k():
    k_to_reach = load("tradeoff").k_to_reach
    ks, accuracy = [1, 2, 4, 8], [0.2, 0.4, 0.6, 0.8]
    assert k_to_reach(ks, accuracy, 0.5) == pytest.approx(math.sqrt(8))  # halfway from 2 to 4
    assert k_to_reach(ks, accuracy, 0.1) == 1 and k_to_reach(ks, accuracy, 0.9) is None
    assert k_to_reach([1, 2, 4], [0.2, 0.6, 0.5], 0.55) == pytest.approx(2 ** 0.875)  # first crossing


def test_iso_accuracy_slope_on_a_known_surface():
    """accuracy = 0.05 * (log2 k + 1.5 log2 D) - 0.3: a contour keeps log2 k + 1.5 log2 D fixed,
    so its slope d log k / d log D is -1.5 and 2x data is worth 2 ** 1.5 samples."""
    tradeoff = load("tradeoff")
    ks = [1, 2, 4, 8, 16, 32, 64, 128]
    curves = {d: (ks, [0.05 * (math.log2(k) + 1.5 * math.log2(d)) - 0.3 for k in ks])
              for d in (16, 32, 64, 128)}
    contours = tradeoff.iso_accuracy(curves, (0.2, 0.4, 0.6))
    assert all(k > 1 for points in contours.values() for _, k in points)  # censored points left out
    fit = tradeoff.fit_common_slope(contours)
    assert fit.slope == pytest.approx(-1.5) and fit.r2 == pytest.approx(1.0)
    assert fit.k_factor(2) == pytest.approx(2 ** 1.5) and fit.k_factor(10) == pytest.approx(10 ** 1.5)
    assert tradeoff.fit_common_slope({0.5: [(16, 4.0)]}) is None  # no contour with two points
    assert {round(slope, 6) for *_, slope in tradeoff.local_slopes(contours)} == {-1.5}
    gain, r2 = tradeoff.log_linear_fit(ks, curves[16][1])
    assert gain == pytest.approx(0.05) and r2 == pytest.approx(1.0)
    # D=16 tops out at 0.35 at k=128: the line would reach 0.45 two doublings later
    assert tradeoff.extrapolate_k(ks, curves[16][1], 0.45) == pytest.approx(512)
    assert tradeoff.extrapolate_k(ks, curves[16][1], 0.9) is None  # beyond 64 x 128


# -- the analysis on a synthetic sweep --------------------------------------------------------------
def fake_run(run_dir: Path, train_size: int, seed: int, skill: float, n: int = 8) -> None:
    """A run dir as training + evaluation leave it: the config, a final summary record, and two
    evaluations whose samples are correct with a probability that grows with `skill`."""
    config = dataclasses.replace(replace(tiny_config(), task={"train_size": train_size,
                                                              "eval_size": 16}), seed=seed)
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.structured(config), run_dir / ".hydra" / "config.yaml")
    (run_dir / "metrics.jsonl").write_text(json.dumps(
        {"step": 6, "split": "eval", "exact_match": skill}) + "\n")
    task = build_task(config.task)
    rng = np.random.default_rng([train_size, seed])
    for temperature in (1.0, 0.5):
        sampling = SamplingConfig(num_samples=n, temperature=temperature)
        records = []
        for i, problem in enumerate(task.eval_problems()):
            expected = task.answer(problem)
            p_correct = float(np.clip(skill + 0.3 * rng.standard_normal()
                                      - 0.1 * task.difficulty(problem), 0.0, 1.0))
            answers = [expected if rng.random() < p_correct else rng.choice(["999", "1"])
                       for _ in range(n)]
            samples = [{"answer": a, "correct": a == expected, "logprob": float(-rng.random()),
                        "tokens": len(a) + 1, "eos": True} for a in answers]
            records.append({"problem": i, "prompt": task.prompt(problem), "expected": expected,
                            "difficulty": task.difficulty(problem),
                            "greedy": {**samples[0], "correct": p_correct > 0.5}, "samples": samples})
        key = settings_key(6, sampling, None)
        directory = run_dir / "test_time" / key
        directory.mkdir(parents=True)
        (directory / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        rows = [r["samples"] for r in records]
        summary = {"step": 6, "settings": key, "problems": len(records), **to_dict(sampling),
                   "greedy_accuracy": float(np.mean([r["greedy"]["correct"] for r in records])),
                   **selection_metrics([[s["correct"] for s in row] for row in rows],
                                       [[s["logprob"] for s in row] for row in rows],
                                       [[s["answer"] for s in row] for row in rows],
                                       [0.0, 0.01, 0.05], 50, 0)}
        (directory / "summary.json").write_text(json.dumps(summary))


def test_analysis_writes_every_table_and_figure(tmp_path):
    sweep = tmp_path / "sweep"
    for d, skill in ((100, 0.2), (200, 0.45), (400, 0.7), (1000, 0.9)):
        for seed in (0, 1):
            fake_run(sweep / f"D{d}-seed{seed}", d, seed, skill)
    out = tmp_path / "results"
    load("analyze").main([str(sweep), "--out", str(out), "--resamples", "20"])
    for name in ("summary.md", "runs.csv", "curves.csv", "tradeoff.json", "accuracy_vs_k.png",
                 "iso_accuracy.png", "flops.png", "by_difficulty.png", "success_histogram.png",
                 "settings.png"):
        assert (out / name).stat().st_size > 0, name
    summary = (out / "summary.md").read_text()
    for section in ("## Accuracy vs k", "## Iso-accuracy contours", "## The k that matches 2x and "
                    "10x data", "## FLOPs", "## By difficulty", "## Per-problem success rates"):
        assert section in summary
    assert "2x: D=100 vs 200" in summary and "10x: D=100 vs 1000" in summary
    tradeoff = json.loads((out / "tradeoff.json").read_text())
    assert tradeoff["setting"] == "T1-k0-p1-n8-seed0" and tradeoff["slopes"]["pass"]["slope"] < 0
    runs_csv = (out / "runs.csv").read_text().splitlines()
    assert len(runs_csv) == 1 + 8 * 2  # a row per run and setting
    d, seed, setting, n_params, tokens = runs_csv[1].split(",")[:5]
    assert (d, seed, setting) == ("100", "0", "T0.5-k0-p1-n8-seed0")
    assert int(tokens) == 6 * 16 * 11 and int(n_params) > 0  # steps x batch x <bos>00+00=000<eos>


@pytest.mark.parametrize("make, message", [
    (lambda root: root / "missing", "is not a directory"),
    (lambda root: root, "holds no training runs"),
])
def test_analysis_refuses_a_missing_or_empty_sweep(tmp_path, make, message):
    with pytest.raises(SystemExit, match=message):
        load("analyze").main([str(make(tmp_path)), "--out", str(tmp_path / "out")])


def test_analysis_refuses_runs_without_evaluations_and_unknown_settings(tmp_path):
    fake_run(tmp_path / "D100-seed0", 100, 0, 0.5)
    with pytest.raises(SystemExit, match="--setting T9 matches none of the evaluated settings"):
        load("analyze").main([str(tmp_path), "--setting", "T9", "--out", str(tmp_path / "out")])
    for summary in tmp_path.glob("*/test_time/*/summary.json"):
        summary.unlink()
    with pytest.raises(SystemExit, match="has an evaluation"):
        load("analyze").main([str(tmp_path), "--out", str(tmp_path / "out")])
