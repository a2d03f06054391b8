"""A run's score: the one number `python -m jaxformer.train` returns to a sweeper that reads it
(`hydra/sweeper: optuna`), from the run's metric records (`score` in the training config).

  score.metric   an eval metric (`bpb`, `loss`, `accuracy`, `exact_match`...; bare names are eval
                 metrics, `eval/NAME` and `train/NAME` as jaxformer.compare names them)
  score.mode     min | max: how it improves (the sweeper's `direction` must agree: cli/train.py)
  score.reduce   best: the best of the run's records of it | final: its last record

A run that diverged (a non-finite training step), or whose score is not a finite number, scores
the worst value there is (+inf under min, -inf under max): the search records it as a completed
trial and steers away from it, where NaN would fail the trial and leave its region unexplored.
A metric the run never recorded is a UserError naming the ones it did.
"""

from __future__ import annotations

import math

from jaxformer.analysis.compare import metric_curves, qualify_metric
from jaxformer.config import ScoreConfig
from jaxformer.errors import UserError


def worst_score(score: ScoreConfig) -> float:
    """What a diverged run scores: nothing is worse."""
    return math.inf if score.mode == "min" else -math.inf


def run_score(records: list[dict], score: ScoreConfig) -> float:
    """`score.metric` of a run's metric records (RunDir.metrics()), reduced as `score` says."""
    if score.metric is None:
        raise UserError("score.metric is null: name the metric a search optimises (e.g. "
                        "score.metric=bpb score.mode=min)")
    curves = metric_curves(records)
    name = qualify_metric(score.metric, curves, key="score.metric", whose="this run")
    values = [value for _, value in curves[name]]
    if score.reduce == "final":
        value = values[-1]
    else:
        finite = [value for value in values if math.isfinite(value)]
        value = (min if score.mode == "min" else max)(finite) if finite else math.nan
    return value if math.isfinite(value) else worst_score(score)
