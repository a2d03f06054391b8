"""Hyperparameter search (hydra/sweeper=optuna, conf/experiment/search_lr_wd.yaml): the score a
run returns (jaxformer/analysis/score.py), the check of the sweeper's direction against it, and
a finished tiny search."""

from __future__ import annotations

import math

import numpy as np
import pytest
from omegaconf import OmegaConf

from helpers import run_module, write_corpus
from jaxformer.analysis.score import run_score
from jaxformer.cli.app import _one_line, check_targets, preflight
from jaxformer.cli.train import check_sweeper
from jaxformer.config import ScoreConfig, to_train_config
from jaxformer.errors import UserError
from jaxformer.runs import DIVERGED, FINISHED_STATE, RunDir

RECORDS = [
    {"step": 1, "split": "train", "loss": 4.0, "lr": 0.1},
    {"step": 2, "split": "eval", "loss": 3.0, "bpb": 2.5, "accuracy": 0.2},
    {"step": 3, "split": "train", "loss": 2.0, "lr": 0.1},
    {"step": 4, "split": "eval", "loss": 3.5, "bpb": 2.9, "accuracy": 0.4},
    {"step": 4, "split": "summary", "eval/bpb": 2.9},
]


@pytest.mark.parametrize("metric, mode, reduce, expected", [
    ("bpb", "min", "best", 2.5), ("bpb", "min", "final", 2.9),
    ("accuracy", "max", "best", 0.4), ("eval/accuracy", "max", "final", 0.4),
    ("loss", "max", "best", 3.5),  # the mode picks, whatever the metric's name suggests
    ("train/loss", "min", "best", 2.0),
])
def test_score_reduces_a_metric_of_the_records(metric, mode, reduce, expected):
    assert run_score(RECORDS, ScoreConfig(metric, mode, reduce)) == expected


def test_non_finite_scores_are_the_worst():
    diverged = [*RECORDS, {"step": 6, "split": "eval", "loss": math.nan, "bpb": math.inf}]
    assert run_score(diverged, ScoreConfig("bpb", "min", "best")) == 2.5  # finite ones count
    assert run_score(diverged, ScoreConfig("bpb", "min", "final")) == math.inf
    assert run_score(diverged, ScoreConfig("loss", "max", "final")) == -math.inf
    only_nan = [{"step": 2, "split": "eval", "loss": math.nan}]
    assert run_score(only_nan, ScoreConfig("loss", "min", "best")) == math.inf


def test_a_metric_the_run_lacks_is_one_line_naming_the_ones_it_has():
    with pytest.raises(UserError, match=r"^score.metric=exact_match is not a metric of this run: "
                       r"pick one of loss, bpb, accuracy, train/loss \(bare names are eval"):
        run_score(RECORDS, ScoreConfig("exact_match"))
    with pytest.raises(UserError, match="score.metric=loss is not a metric of this run: no metric"):
        run_score([], ScoreConfig("loss"))
    with pytest.raises(UserError, match="score.mode='down' is not one of min, max"):
        ScoreConfig("loss", mode="down")


def sweeper(**fields):
    return OmegaConf.create(fields)


def scored(metric=None, mode="min"):
    return OmegaConf.create({"score": {"metric": metric, "mode": mode}})


def test_the_sweeper_direction_must_match_the_score():
    check_sweeper(sweeper(params={"seed": "0,1"}), scored())  # no direction: returns unread
    check_sweeper(sweeper(direction="maximize"), scored("accuracy", "max"))
    with pytest.raises(UserError, match=r"direction=minimize but score.mode=max: set "
                                        r"score.mode=min"):
        check_sweeper(sweeper(direction="minimize"), scored("bpb", "max"))
    with pytest.raises(UserError, match="score.metric is null: name the metric"):
        check_sweeper(sweeper(direction="minimize"), scored())
    with pytest.raises(UserError, match="returns one score"):
        check_sweeper(sweeper(direction=["minimize", "maximize"]), scored("bpb"))


def test_preflight_refuses_a_search_against_its_score_in_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        preflight(["-m", "experiment=search_lr_wd", "score.mode=max"], "train", to_train_config,
                  check_sweeper)
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("error: hydra.sweeper.direction=minimize but score.mode="
                                       "max: set score.mode=min (or the direction the other way)\n")
    # a search range on the command line is checked at its start
    with pytest.raises(SystemExit):
        preflight(["-m", "experiment=search_lr_wd", "optim.warmup_steps=int(interval(-5, 3))"],
                  "train", to_train_config, check_sweeper)
    assert "optim.warmup_steps=-5 must be >= 0" in capsys.readouterr().err


def test_optuna_samplers_may_be_instantiated_and_the_search_space_hook_is_checked():
    sampler = {"_target_": "optuna.samplers.TPESampler", "seed": 0}
    check_targets(OmegaConf.create({"hydra": {"sweeper": {"sampler": sampler}}}))
    with pytest.raises(UserError, match=r"^hydra.sweeper.custom_search_space=os.system is not "
                                        r"allowed: only classes under hydra."):
        check_targets(OmegaConf.create({"hydra": {"sweeper": {
            "sampler": sampler, "custom_search_space": "os.system"}}}))


def test_a_missing_sweeper_plugin_names_its_install():
    from hydra.errors import MissingConfigException

    err = MissingConfigException("In 'hydra/config': Could not find 'hydra/sweeper/optuna'\n"
                                 "Available options in 'hydra/sweeper':\n\tbasic\n\tgrids",
                                 "hydra/sweeper/optuna")
    assert _one_line(err) == ("In 'hydra/config': Could not find 'hydra/sweeper/optuna' (needs "
                              'hydra-optuna-sweeper: pip install -e ".[search]")')


WORDS = "the quick brown fox jumps over a lazy dog and runs far away".split()


def documents(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 30))) + "." for _ in range(n)]


# experiment=search_lr_wd at tiny shapes on a tiny corpus; the learning rate is 3e-3 or 1e30
# (no clipping: a run at 1e30 diverges), and sampler seed 4 draws both: 3e-3, 3e-3, 1e30
TINY_SEARCH = [
    "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.n_layers=1",
    "model.max_len=32", "task.seq_len=32", "task.eval_size=8", "trainer.steps=4",
    "trainer.batch_size=4", "trainer.eval_every=2", "trainer.eval_batch_size=8",
    "trainer.log_every=1", "trainer.checkpoint_every=4", "trainer.compilation_cache_dir=null",
    "optim.clip_norm=0", "optim.lr=choice(3e-3,1e30)", "hydra.sweeper.n_trials=3",
    "hydra.sweeper.sampler.seed=4",
]


def test_a_tiny_search_finishes_and_reports_its_best_trial(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", documents(120, 0), documents(20, 1))
    sweep = tmp_path / "sweep"
    done = run_module("jaxformer.train", "-m", "experiment=search_lr_wd",
                      f"task.data_dir={corpus}", *TINY_SEARCH, f"hydra.sweep.dir={sweep}")
    assert done.returncode == 0, done.stderr[-3000:]
    runs = sorted(path.parent for path in sweep.glob("*/metrics.jsonl"))
    assert len(runs) == 3  # one run dir per trial, named by its parameters
    assert all(run.name.startswith("optim.lr=") and "optim.warmup_steps=" in run.name
               for run in runs)
    states = [RunDir(run).state() for run in runs]
    assert sorted(states) == [DIVERGED, FINISHED_STATE, FINISHED_STATE]
    # each trial's score, read back from its records: its best eval bpb, +inf if it diverged
    scores = [math.inf if state == DIVERGED else min(r["bpb"] for r in RunDir(run).metrics("eval"))
              for run, state in zip(runs, states)]
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert results.best_value == pytest.approx(min(scores))
    best = results.best_params
    assert set(best) == {"optim.lr", "optim.weight_decay", "optim.warmup_steps"}
    assert best["optim.lr"] == 3e-3 and 0.0 <= best["optim.weight_decay"] <= 0.3
    assert isinstance(best["optim.warmup_steps"], int) and 0 <= best["optim.warmup_steps"] <= 40
    best_run = runs[scores.index(min(scores))]
    assert f"optim.warmup_steps={best['optim.warmup_steps']}," in best_run.name
    # the best trial's run dir holds the best parameters
    config = RunDir(best_run).config.optim
    assert (config.lr, config.weight_decay, config.warmup_steps) == (
        best["optim.lr"], best["optim.weight_decay"], best["optim.warmup_steps"])
