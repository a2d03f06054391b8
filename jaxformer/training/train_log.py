"""The train and diagnostics records of a run, deferred (DESIGN idiom 5): step N's metrics become
floats only once step N+1 is dispatched, so the device never waits on the host for a log line.
Every step is read (a skipped, non-finite step must stop the run or be counted); the train record
is written every trainer.log_every steps, at the last step, and for every skipped step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from jaxformer.config import TrainerConfig
from jaxformer.parallel import to_host
from jaxformer.progress import Progress
from jaxformer.runs import stops_training
from jaxformer.tracking import Tracker
from jaxformer.training.checkpoint import Checkpointer
from jaxformer.training.diagnostics import diagnostics_metrics
from jaxformer.training.hooks import StepInfo


def check_finite(metrics: dict[str, float], step: int, trainer: TrainerConfig,
                 checkpointer: Checkpointer) -> None:
    """Stop on a skipped (non-finite) step unless trainer.nonfinite=skip allows it."""
    if not stops_training(metrics, trainer):
        return
    skipped = int(metrics["skipped_steps"])
    latest = checkpointer.latest_step()
    last_good = "none yet" if latest is None else str(checkpointer.directory / str(latest))
    cause = (f"{skipped} steps skipped (more than trainer.max_skipped_steps="
             f"{trainer.max_skipped_steps})" if trainer.nonfinite == "skip" else
             "set trainer.nonfinite=skip to skip such steps")
    raise FloatingPointError(
        f"non-finite training step {step} (loss {metrics['loss']}, gradient norm "
        f"{metrics['grad_norm']}); its update was not applied. Last good checkpoint: {last_good}. "
        f"Lower optim.lr or raise optim.warmup_steps, or {cause}")


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in to_host(metrics).items()}


@dataclass(frozen=True)
class StepCost:
    """What one optimizer step processes: the throughput fields of each train record divide it
    by the time steps took (wall clock between records, compilation included in the first)."""

    tokens: int  # batch_size x the objective's positions
    flops: float | None = None  # model FLOPs (objective.train_flops_per_example x batch_size)
    peak_flops: float = 0.0  # FLOP/s of all devices (training/throughput.py); 0: unknown

    def metrics(self, steps: int, seconds: float) -> dict[str, float]:
        seconds = max(seconds, 1e-9)
        out = {"tokens_per_s": self.tokens * steps / seconds, "step_time_s": seconds / steps}
        if self.flops and self.peak_flops:
            out["mfu"] = self.flops * steps / seconds / self.peak_flops
        return out


class TrainLog:
    def __init__(self, tracker: Tracker, trainer: TrainerConfig, checkpointer: Checkpointer,
                 progress: Progress, cost: StepCost, start_step: int,
                 rows_per_epoch: int | None = None):
        self.tracker, self.trainer, self.checkpointer = tracker, trainer, checkpointer
        self.progress, self.cost = progress, cost
        self.rows_per_epoch = rows_per_epoch  # a corpus of fixed rows (text): epochs are logged
        self.pending: tuple[int, dict] | None = None  # a dispatched step's metrics, unread
        self.pending_diagnostics: tuple[int, dict] | None = None
        self.last_time, self.last_step = time.perf_counter(), start_step  # of the last record

    def record(self, info: StepInfo) -> None:
        """Once step N is dispatched: write step N-1, hold step N's metrics."""
        self.flush()
        self.pending = (info.step, info.metrics)

    def record_diagnostics(self, step: int, result: dict) -> None:
        """Diagnostics dispatched before update step+1; written once that update is dispatched."""
        self.pending_diagnostics = (step, result)

    def is_log_step(self, step: int, metrics: dict[str, float]) -> bool:
        return bool(metrics["nonfinite"]) or step % self.trainer.log_every == 0 \
            or step == self.trainer.steps

    def flush(self) -> None:
        """Write what is held: the diagnostics, then the held step's record when it is a log step;
        then stop the run if that step was non-finite (check_finite). Called before anything that
        must follow the step's record or know it was finite: evaluation, a checkpoint, the end."""
        if self.pending_diagnostics is not None:
            step, result = self.pending_diagnostics
            self.tracker.log(diagnostics_metrics(result), step, "diagnostics")
            self.pending_diagnostics = None
        if self.pending is None:
            return
        step, device_metrics = self.pending
        self.pending = None
        metrics = _floats(device_metrics)
        if not self.is_log_step(step, metrics):
            return
        now = time.perf_counter()
        metrics.update(self.cost.metrics(step - self.last_step, now - self.last_time))
        self.last_time, self.last_step = now, step
        if self.rows_per_epoch:
            metrics["epoch"] = step * self.trainer.batch_size / self.rows_per_epoch
        self.tracker.log(metrics, step, "train")  # a skipped step is part of the run's record
        self.progress.report(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        check_finite(metrics, step, self.trainer, self.checkpointer)
