"""Held-out evaluation during training: the teacher-forced loss and accuracy, and exact match of
the greedy answers (each objective decides how its model answers; the task checks the text).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import numpy as np
from flax import nnx

from jaxformer.data.pipeline import padded_batches
from jaxformer.objectives import EvalSet, Objective
from jaxformer.parallel import to_host


MEANS = ("loss", "accuracy")  # per-batch means over `count`; every other metric is a sum


def eval_loss(eval_step: Callable, params: nnx.State, data: EvalSet, batch_size: int,
              objective: Objective) -> dict:
    """Teacher-forced metrics pooled exactly over tokens (or examples), as the objective
    summarises them (loss and accuracy; bits per byte on text)."""
    totals = defaultdict(float)
    for batch, _ in padded_batches(data.examples, batch_size):
        metrics = to_host(eval_step(params, batch))
        count = float(metrics["count"])  # padding rows carry no loss weight (or label count)
        for key, value in metrics.items():
            totals[key] += float(value) * count if key in MEANS else float(value)
    pooled = {key: total / totals["count"] if key in MEANS else total
              for key, total in totals.items()}
    return objective.summarize(pooled, data)


def exact_match(task, data: EvalSet, completions: list[str]) -> dict[str, float]:
    """Overall accuracy and accuracy per difficulty bin (e.g. digits of the longer operand)."""
    by_difficulty: dict[int, list[bool]] = defaultdict(list)
    for problem, text in zip(data.problems, completions):
        by_difficulty[task.difficulty(problem)].append(task.check(problem, text))
    everything = [ok for oks in by_difficulty.values() for ok in oks]
    metrics = {"exact_match": float(np.mean(everything))}
    for difficulty, oks in sorted(by_difficulty.items()):
        metrics[f"exact_match_{difficulty}{task.difficulty_unit}"] = float(np.mean(oks))
    return metrics
