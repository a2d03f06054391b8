"""`python -m jaxformer.compare`: grouping by what differs, seeds pooled against the metrics files,
the files it writes, incomplete runs listed, one-line errors. On real tiny runs: a plain MLP on
the teacher task (no decoding to compile), 2 widths x 2 seeds."""

from __future__ import annotations

import csv
import json
import math
import shutil
import statistics
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import run_module
from jaxformer.analysis.compare import CompareConfig, compare, number
from jaxformer.cli.compare import launch, to_overrides
from jaxformer.config import (
    LoggerConfig, ModelConfig, OptimConfig, TaskConfig, TrainConfig, TrainerConfig, WandbConfig,
)
from jaxformer.errors import UserError
from jaxformer.runs import FINISHED, HYDRA_CONFIG, METRICS, RunDir
from jaxformer.training.loop import train
from jaxformer.training.run_dir import RunLock

WIDTHS, SEEDS = (16, 32), (0, 1)


def run_config(d_model: int, seed: int) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(kind="mlp", residual=False, norm="none", d_model=d_model, n_layers=2),
        task=TaskConfig(name="teacher", eval_size=64),
        optim=OptimConfig(lr=3e-3, warmup_steps=0, schedule="constant"),
        trainer=TrainerConfig(steps=6, batch_size=32, log_every=1, eval_every=3,
                              checkpoint_every=6, eval_batch_size=32, progress=False),
        logger=LoggerConfig(wandb=WandbConfig(mode="disabled")), seed=seed)


def hydra_run(run_dir: Path, config: TrainConfig) -> None:
    """A run as `python -m jaxformer.train` leaves it: trained, and its .hydra/config.yaml."""
    train(config, run_dir)
    save_config(run_dir, config)


def save_config(run_dir: Path, config: TrainConfig) -> None:
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.structured(config), run_dir / HYDRA_CONFIG)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A Hydra multirun folder: a job dir per (width, seed)."""
    root = tmp_path_factory.mktemp("study") / "sweep"
    for d_model in WIDTHS:
        for seed in SEEDS:
            hydra_run(root / f"model.d_model={d_model},seed={seed}", run_config(d_model, seed))
    return root


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]


def keep_records(run_dir: Path, keep) -> None:
    lines = [json.dumps(r) for r in records(run_dir) if keep(r)]
    (run_dir / METRICS).write_text("".join(line + "\n" for line in lines))


@pytest.fixture(scope="module")
def partial(sweep, tmp_path_factory) -> Path:
    """Runs as a crash, a divergence or a bad edit leave them (copies of a finished one)."""
    root = tmp_path_factory.mktemp("partial")
    source = sweep / "model.d_model=16,seed=0"
    for name in ("interrupted", "diverged", "no_eval"):
        shutil.copytree(source, root / name)
    for name in ("interrupted", "diverged"):  # killed after step 3
        (root / name / FINISHED).unlink()
        keep_records(root / name, lambda r: r["step"] <= 3 and r["split"] != "summary")
    with (root / "diverged" / METRICS).open("a") as file:  # what check_finite stops after
        file.write(json.dumps({"step": 4, "split": "train", "loss": math.nan, "nonfinite": 1.0,
                               "skipped_steps": 1.0, "tokens_per_s": 1000.0}) + "\n")
    keep_records(root / "no_eval", lambda r: r["split"] == "train")
    save_config(root / "not_started", run_config(16, 2))
    (root / "unreadable" / ".hydra").mkdir(parents=True)
    (root / "unreadable" / HYDRA_CONFIG).write_text("model:\n  kind: transformerz\n")
    return root


# -- grouping and pooling --------------------------------------------------------------------------
def test_runs_group_by_what_differs_and_seeds_pool(sweep):
    comparison = compare(CompareConfig(paths=[str(sweep)]), write=False)
    assert comparison.by == ["model.d_model"]  # the seed differs too, and is pooled
    assert [group.values for group in comparison.groups] == [(16,), (32,)]
    assert not comparison.incomplete
    for group, d_model in zip(comparison.groups, WIDTHS):
        assert [row.config["seed"] for row in group.rows] == list(SEEDS)
        run_dirs = [sweep / f"model.d_model={d_model},seed={seed}" for seed in SEEDS]
        evals = [[r["loss"] for r in records(path) if r["split"] == "eval"] for path in run_dirs]
        finals, bests = [losses[-1] for losses in evals], [min(losses) for losses in evals]
        table = {row.path.name: row for row in group.rows}
        for path, final, best in zip(run_dirs, finals, bests):
            row = table[path.name]
            assert (row.final["loss"], row.best["loss"], row.state) == (final, best, "finished")
            assert (row.steps, row.tokens, row.params) == (6, 6 * 32, RunDir(path).n_params)
            rates = [r["tokens_per_s"] for r in records(path) if r["split"] == "train"]
            assert row.tokens_per_s == statistics.median(rates)
            # each record's rate is tokens over the time since the one before
            assert row.wall_s == pytest.approx(sum(32 / rate for rate in rates))
        groups_csv = {int(r["model.d_model"]): r for r in read_csv_rows(comparison, sweep)}
        line = groups_csv[d_model]
        assert float(line["loss_final_mean"]) == pytest.approx(statistics.mean(finals))
        assert float(line["loss_final_std"]) == pytest.approx(statistics.stdev(finals))
        assert float(line["loss_best_mean"]) == pytest.approx(statistics.mean(bests))
        assert (line["loss_final_n"], line["runs"], line["states"]) == ("2", "2", "2 finished")


def read_csv_rows(comparison, sweep) -> list[dict]:
    out = sweep.parent / "compare"
    if not (out / "compare.csv").exists():
        comparison.write(out)
    with (out / "compare.csv").open() as file:
        return list(csv.DictReader(file))


def test_by_chooses_the_groups_and_rejects_unknown_keys(sweep):
    by_seed = compare(CompareConfig(paths=[str(sweep)], by=["seed"]), write=False)
    assert [g.values for g in by_seed.groups] == [(0,), (1,)]
    assert [len(g.rows) for g in by_seed.groups] == [2, 2]
    assert len(compare(CompareConfig(paths=[str(sweep)], by=[]), write=False).groups) == 1
    with pytest.raises(UserError, match=r"metric=bpb is not a metric of these runs: pick one "
                                        r"of loss, accuracy"):
        compare(CompareConfig(paths=[str(sweep)], metric="bpb"), write=False)


# -- files -----------------------------------------------------------------------------------------
def test_the_files_and_the_incomplete_runs(sweep, partial, tmp_path):
    out = tmp_path / "report"
    comparison = compare(CompareConfig(paths=[str(sweep), str(partial)], out=str(out),
                                       metric="train/loss"))
    assert comparison.metric == "train/loss"
    for name in ("compare.md", "compare.csv", "runs.csv", "train_loss.png"):
        assert (out / name).stat().st_size > 0, name
    problems = {row.path.name: (row.state, "; ".join(row.problems))
                for row in comparison.incomplete}
    assert problems == {
        "interrupted": ("interrupted", "interrupted at step 3 of 6"),
        "diverged": ("diverged",
                     "diverged: non-finite training step 4 (loss nan, 1 steps skipped)"),
        "no_eval": ("finished", "no eval records"),
        "not_started": ("not started", "not started: no metrics.jsonl"),
        "unreadable": ("not started", f"config unreadable: the config of {partial}/unreadable/"
                                      f"{HYDRA_CONFIG} is not valid today: model.kind="
                                      "'transformerz' is not one of encoder, decoder, "
                                      "encoder_decoder, mlp; not started: no metrics.jsonl"),
    }
    markdown, report = (out / "compare.md").read_text(), comparison.report()
    for name, (_, problem) in problems.items():
        assert f"{name}: {problem}" in markdown and f"{name}: {problem}" in report
    # every readable run is in a group; the partial copies join the d_model=16 seeds
    (small, large) = comparison.groups
    assert len(small.rows) == 6 and len(large.rows) == 2
    assert sum(len(g.rows) for g in comparison.groups) == len(comparison.rows) - 1
    with (out / "runs.csv").open() as file:
        assert len(list(csv.DictReader(file))) == 9
    line = next(line for line in comparison.headline_table().splitlines()
                if line.startswith("| 16"))
    assert "| 6 | 3 finished, 1 interrupted, 1 diverged, 1 not started | 3–6 (n=5) |" in line
    # the eval metrics pool the finished runs that have them
    finals = [row.final["loss"] for row in small.rows if row.state == "finished" and row.final]
    pooled = number(statistics.mean(finals), statistics.stdev(finals))
    assert len(finals) == 2 and f"| {pooled} (n=2) |" in line


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="the lock is read from /proc/locks")
def test_a_run_holding_its_lock_is_running(partial):
    run = RunDir(partial / "interrupted")
    with RunLock(run.path):
        assert run.state() == "running"
    assert run.state() == "interrupted"


def test_default_output_is_beside_the_first_path(sweep):
    comparison = compare(CompareConfig(paths=[str(sweep / "model.d_model=32,seed=1")]))
    out = sweep / "compare"
    assert comparison.files == [out / "compare.md", out / "compare.csv", out / "runs.csv",
                                out / "eval_loss.png"]
    assert comparison.groups[0].label(comparison.by) == "all runs"
    shutil.rmtree(out)


# -- the command line ------------------------------------------------------------------------------
def test_command_line_paths_and_options_become_overrides():
    assert to_overrides(["multirun/x", "sweep/model.d_model=16,seed=0", "--by", "a.b,c",
                         "--metric=train/loss", "out=o", "hydra.verbose=true"]) == [
        "by=['a.b','c']", "metric='train/loss'", "out=o", "hydra.verbose=true",
        "paths=['multirun/x','sweep/model.d_model=16,seed=0']"]
    assert to_overrides(["r", "--by", ""]) == ["by=[]", "paths=['r']"]


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The app in this process, for mistakes refused before Hydra starts (a Hydra job run here
    would outlive pytest's captured streams)."""
    monkeypatch.setattr(sys, "argv", ["compare", *args])
    with pytest.raises(SystemExit) as stopped:
        launch()
    out, err = capsys.readouterr()
    return stopped.value.code, out, err


def run_app(*args: str) -> tuple[int, str, str]:
    done = run_module("jaxformer.compare", *args)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize("args, message", [
    (["{tmp}/missing"], "{tmp}/missing does not exist: pass run dirs or sweep dirs"),
    (["{tmp}"], "{tmp} holds no runs (no .hydra/config.yaml at any depth)"),
    (["{sweep}", "--by"], "--by needs a value"),
], ids=["missing path", "no runs", "option without value"])
def test_bad_command_lines_are_one_line(monkeypatch, capsys, tmp_path, sweep, args, message):
    fill = {"tmp": tmp_path, "sweep": sweep}
    code, out, err = run_cli(monkeypatch, capsys, *(a.format(**fill) for a in args))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message.format(**fill) in err and not out


def test_an_unknown_key_is_one_line(sweep):
    """Found once the runs are read, inside the Hydra job (an unknown metric too: same path)."""
    code, out, err = run_app(str(sweep), "--by=model.dmodel")
    assert code == 2 and err.count("\n") == 1 and not out, err
    assert err.startswith("error: by=model.dmodel is not a config key of these runs: did you mean "
                          "model.d_model"), err


def test_the_app_prints_the_table(sweep, tmp_path):
    code, out, err = run_app(str(sweep), "--by", "model.d_model", f"out={tmp_path}")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "4 runs in 2 groups, by model.d_model; seeds pooled: mean ± std"
    assert lines[2].startswith("| model.d_model | n | state | steps | tokens | params | tokens/s")
    assert lines[4].startswith("| 16 | 2 | 2 finished | 6 | 192 |")
    assert (tmp_path / "eval_loss.png").exists()
