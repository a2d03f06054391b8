"""The training loop: set the run up (training/setup.py), then one jitted step after another, with
the periodic work around each step registered as hooks (training/hooks.py).

Around update N (the state has taken N-1 updates):
  before it   diagnostics every trainer.diagnostics_every steps, on the batch update N will use
  after it    the train log (step N-1's metrics, read now that N is dispatched: train_log.py),
              evaluation every trainer.eval_every steps and at the last, the preemption check,
              a checkpoint when due, and the stop after a preemption's checkpoint
"""

from __future__ import annotations

import contextlib
import signal
from dataclasses import dataclass, field
from pathlib import Path

from flax import nnx

from jaxformer.config import TrainConfig
from jaxformer.parallel import global_batch, initialize_distributed, is_main_process, use_mesh
from jaxformer.progress import Progress
from jaxformer.runs import METRICS, RunDir, metrics_summary
from jaxformer.training.evaluation import eval_loss, exact_match
from jaxformer.training.hooks import Hooks, StepInfo
from jaxformer.training.preemption import Preempted, SaveTriggers
from jaxformer.training.run_dir import RunLock, write_finished
from jaxformer.training.setup import Prepared, TrainSetup, prepare, set_up
from jaxformer.training.state import TrainState
from jaxformer.training.train_log import TrainLog


@dataclass
class TrainResult:
    run_dir: Path
    metrics_path: Path
    wandb_dir: str | None
    step: int
    objective: str
    eval_metrics: dict[str, float]
    samples: list[tuple[str, str, str, bool]]  # (prompt, completion, expected, correct)
    already_finished: bool = False  # the run dir held a finished run: nothing was recomputed
    init_report: list[str] | None = None  # what finetune.init_from loaded (None: nothing)

    def record(self) -> dict:
        """What the finished marker keeps, so a relaunch can report without recomputing."""
        return {"step": self.step, "objective": self.objective, "wandb_dir": self.wandb_dir,
                "eval_metrics": self.eval_metrics, "samples": self.samples}


def finished_result(run_dir: Path, record: dict) -> TrainResult:
    return TrainResult(run_dir, run_dir / METRICS, record.get("wandb_dir"), record["step"],
                       record["objective"], record["eval_metrics"],
                       [tuple(sample) for sample in record.get("samples", [])],
                       already_finished=True)


def train(cfg: TrainConfig, run_dir: Path | str, job_name: str | None = None) -> TrainResult:
    """Train (or resume) the run in `run_dir`. A run that already reached trainer.steps (its
    finished marker says so) returns its stored result: relaunched sweeps skip finished jobs."""
    initialize_distributed(cfg.mesh)  # before anything touches the devices
    run_dir = Path(run_dir).absolute()
    prepared = prepare(cfg, run_dir)
    finished = RunDir(run_dir).finished
    already_finished = finished is not None and finished["step"] >= cfg.trainer.steps
    if already_finished:
        return finished_result(run_dir, finished)
    lock = RunLock(run_dir) if is_main_process() else contextlib.nullcontext()
    with lock, use_mesh(prepared.mesh), SaveTriggers(cfg.trainer.checkpoint_minutes) as triggers:
        setup = set_up(cfg, run_dir, job_name, prepared)
        result = TrainingLoop(cfg, run_dir, prepared, setup, triggers).run()
    if is_main_process():
        write_finished(run_dir, result.record())
    return result


@dataclass
class LoopState:
    """What the step loop and its hooks share."""

    state: TrainState
    eval_metrics: dict[str, float] = field(default_factory=dict)  # the latest evaluation's
    eval_step: int | None = None  # its step (None: not evaluated yet)
    completions: list[str] = field(default_factory=list)  # its greedy answers (text tasks)
    preempted: bool = False  # this step is the one to save and stop at


class TrainingLoop:
    def __init__(self, cfg: TrainConfig, run_dir: Path, prepared: Prepared, setup: TrainSetup,
                 triggers: SaveTriggers):
        trainer = self.trainer = cfg.trainer
        self.run_dir, self.prepared, self.setup, self.triggers = run_dir, prepared, setup, triggers
        self.loop = LoopState(setup.state)
        self.progress = Progress(trainer.steps, initial=setup.start_step, desc="train",
                                 unit="step", enabled=trainer.progress and is_main_process())
        self.log = TrainLog(setup.tracker, trainer, setup.checkpointer, self.progress,
                            setup.step_cost, setup.start_step,
                            getattr(prepared.task, "train_rows", None))
        self.before_update, self.after_update = Hooks(), Hooks()
        self.before_update.add(self.diagnose, every=trainer.diagnostics_every)
        self.after_update.add(self.log.record)
        self.after_update.add(lambda info: self.progress.update())
        self.after_update.add(self.evaluate_and_report, every=trainer.eval_every, at_last=True)
        self.after_update.add(self.check_preemption)
        self.after_update.add(self.checkpoint_when_due)
        self.after_update.add(self.stop_when_preempted)

    def run(self) -> TrainResult:
        setup, trainer, loop = self.setup, self.trainer, self.loop
        try:
            for step in range(setup.start_step + 1, trainer.steps + 1):
                batch = global_batch(next(setup.data_iter), self.prepared.mesh, trainer.batch_size)
                self.before_update.run(StepInfo(step - 1, loop.state, batch))
                loop.state, metrics = setup.train_step(loop.state, batch)  # donates the old state
                self.after_update.run(StepInfo(step, loop.state, batch, metrics,
                                               last=step == trainer.steps))
            self.log.flush()
            if trainer.eval_every and loop.eval_step is None:
                # no step ran: the restored run had reached trainer.steps; evaluate what it holds
                self.evaluate(setup.start_step)
            setup.checkpointer.wait()
            samples = self.samples()
            records = RunDir(self.run_dir).metrics() if is_main_process() else []
            setup.tracker.summary({"step": int(loop.state.step), **metrics_summary(records)})
        finally:
            self.progress.close()
            setup.checkpointer.close()
            setup.tracker.finish()
        return TrainResult(self.run_dir, self.run_dir / METRICS, setup.wandb_dir,
                           int(loop.state.step), self.prepared.objective.name, loop.eval_metrics,
                           samples, init_report=setup.init_report)

    # -- hooks ------------------------------------------------------------------------------------
    def diagnose(self, info: StepInfo) -> None:
        """Per-layer diagnostics of the update about to be taken (before the state is donated)."""
        restored_step = self.setup.resumed and info.step == self.setup.start_step
        # left to the run that saved that step, which logged them after its checkpoint (a run
        # that ended right there, preempted or at its last step, did not: they stay missing)
        if not restored_step:
            self.log.record_diagnostics(info.step, self.setup.diagnose(info.state, info.batch))

    def evaluate_and_report(self, info: StepInfo) -> None:
        self.log.flush()  # the step's train record first, and the run stops if it was non-finite
        metrics = self.evaluate(info.step)
        name, score = (("exact match", metrics["exact_match"]) if "exact_match" in metrics
                       else ("accuracy", metrics["accuracy"]))
        if is_main_process():
            self.progress.write(f"step {info.step}: eval loss {metrics['loss']:.4f}, "
                                f"{name} {score:.3f}")

    def check_preemption(self, info: StepInfo) -> None:
        self.loop.preempted = self.triggers.preempted(info.step)  # all processes agree on the step

    def checkpoint_when_due(self, info: StepInfo) -> None:
        setup, loop = self.setup, self.loop
        evaluated = loop.eval_metrics if loop.eval_step == info.step else None
        best_candidate = evaluated is not None and self.trainer.keep_best > 0
        # time_to_save last: with several processes it is a broadcast, asked only when nothing
        # else decided (every process evaluates the conditions before it alike)
        due = (setup.checkpointer.should_save(info.step) or info.last or loop.preempted
               or best_candidate or self.triggers.time_to_save())
        if due:
            self.log.flush()  # never checkpoint a step before its finiteness is known
            setup.checkpointer.save(info.step, info.state, setup.data_iter.get_state(),
                                    setup.meta, eval_metrics=evaluated, force=True)
            self.triggers.saved()

    def stop_when_preempted(self, info: StepInfo) -> None:
        if not self.loop.preempted:
            return
        checkpointer = self.setup.checkpointer
        checkpointer.wait()
        self.triggers.forward()
        raise Preempted(f"stopped by {self.triggers.signal_name} at step {info.step} after saving "
                        f"{checkpointer.directory / str(info.step)}: rerun the same command to "
                        "resume", self.triggers.signal or signal.SIGTERM)

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out loss and accuracy; for text answers, greedy answers and their exact match."""
        setup, loop, objective = self.setup, self.loop, self.prepared.objective
        task, batch_size = self.prepared.task, self.trainer.eval_batch_size
        metrics = eval_loss(setup.eval_step, loop.state.params, setup.heldout, batch_size,
                            objective)
        if objective.text_answers:  # answers as text, checked by the task
            model = nnx.merge(setup.graphdef, loop.state.params, setup.rest)
            loop.completions = objective.greedy_answers(model, setup.heldout, task, batch_size)
            metrics.update(exact_match(task, setup.heldout, loop.completions))
        setup.tracker.log(metrics, step, "eval")
        loop.eval_metrics, loop.eval_step = metrics, step
        return metrics

    def samples(self) -> list[tuple[str, str, str, bool]]:
        """A few held-out completions for a human to look at."""
        task = self.prepared.task
        pairs = list(zip(self.setup.heldout.problems, self.loop.completions))
        return [(task.prompt(p), text, task.answer(p), task.check(p, text))
                for p, text in pairs[: self.trainer.num_samples]]
