"""The training loop: build or restore state, run jitted steps, log, evaluate, checkpoint."""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import Mesh
from tqdm import tqdm

from jaxformer.config import ModelConfig, TrainConfig, TrainerConfig, to_dict
from jaxformer.errors import UserError
from jaxformer.data.pipeline import train_iterator
from jaxformer.data.tasks import Task, build_task
from jaxformer.data.tokenizers import save_tokenizer
from jaxformer.data.vectors import TeacherTask
from jaxformer.models import count_params
from jaxformer.objectives import Objective, objective_for
from jaxformer.parallel import (
    batch_sharding, data_parallel_size, global_batch, initialize_distributed, is_main_process,
    make_mesh, process_rows, replicated, to_host, use_mesh, with_shardings,
)
from jaxformer.runs import METRICS, RunDir
from jaxformer.tracking import JsonlTracker, MultiTracker, Tracker, WandbTracker, run_metadata
from jaxformer.training.checkpoint import (
    Checkpointer, StateMismatch, check_compatible, explain_state_mismatch,
)
from jaxformer.training.finetune import freeze_plan_for
from jaxformer.training.diagnostics import diagnostics_metrics, make_diagnostics
from jaxformer.training.evaluation import eval_loss, exact_match
from jaxformer.training.init_from import apply_init, plan_init
from jaxformer.training.optim import make_optimizer, make_schedule
from jaxformer.training.preemption import Preempted, SaveTriggers
from jaxformer.training.run_dir import RunLock, check_writable, write_finished
from jaxformer.training.state import init_train_state, state_layout
from jaxformer.training.step import StepShardings, make_eval_step, make_train_step


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


log = logging.getLogger(__name__)


def finished_result(run_dir: Path, record: dict) -> TrainResult:
    return TrainResult(run_dir, run_dir / METRICS, record.get("wandb_dir"), record["step"],
                       record["objective"], record["eval_metrics"],
                       [tuple(sample) for sample in record.get("samples", [])],
                       already_finished=True)


@dataclass
class Prepared:
    task: Task | TeacherTask
    objective: Objective
    model_cfg: ModelConfig
    mesh: Mesh


def check_parallelism(cfg: TrainConfig, model_cfg: ModelConfig, mesh: Mesh) -> None:
    """The batch splits over the data axes (and micro-batches), heads over the tensor axis."""
    trainer, data_ways, tensor = cfg.trainer, data_parallel_size(mesh), mesh.shape["tensor"]
    if trainer.batch_size % (trainer.grad_accum * data_ways):
        raise UserError(
            f"trainer.batch_size={trainer.batch_size} does not split into "
            f"trainer.grad_accum={trainer.grad_accum} micro-batches over the {data_ways} "
            f"data-parallel devices (mesh.data x mesh.fsdp): make batch_size a multiple of "
            f"{trainer.grad_accum * data_ways}")
    if trainer.batch_size % jax.process_count():
        raise UserError(f"trainer.batch_size={trainer.batch_size} does not split over "
                        f"{jax.process_count()} processes: make it a multiple of that")
    if model_cfg.n_heads % tensor:
        raise UserError(f"model.n_heads={model_cfg.n_heads} is not divisible by "
                        f"mesh.tensor={tensor}: tensor parallelism splits whole heads")
    if model_cfg.d_ff % tensor:
        raise UserError(f"model.d_ff={model_cfg.d_ff} is not divisible by mesh.tensor={tensor}")


def prepare(cfg: TrainConfig, run_dir: Path) -> Prepared:
    """Everything checkable before compiling: task, objective, model sizes, mesh, run dir."""
    if is_main_process():
        check_writable(run_dir)
    mesh = make_mesh(cfg.mesh)
    task = build_task(cfg.task)
    objective = objective_for(cfg.model, task)
    model_cfg = objective.model_config(cfg.model, task)
    check_parallelism(cfg, model_cfg, mesh)
    if (cfg.trainer.keep_best and not objective.text_answers
            and cfg.trainer.best_metric.startswith("exact_match")):
        raise UserError(f"trainer.best_metric={cfg.trainer.best_metric} does not exist for the "
                        f"{task.cfg.name} task (no text answers): use loss or accuracy")
    return Prepared(task, objective, model_cfg, mesh)


def make_tracker(cfg: TrainConfig, run_dir: Path, resume_step: int, config: dict) -> tuple[Tracker, str | None]:
    if not is_main_process():  # one writer per run, whatever the process count
        return MultiTracker([]), None
    trackers: list[Tracker] = [JsonlTracker(run_dir / METRICS, resume_step)]
    wandb_dir = None
    if cfg.logger.wandb.mode != "disabled":
        wb = cfg.logger.wandb
        wandb_tracker = WandbTracker(
            run_dir, wb.mode, wb.project, wb.entity, wb.group or cfg.name,
            config.get("job_name") or run_dir.name, wb.tags, config,
        )
        trackers.append(wandb_tracker)
        wandb_dir = wandb_tracker.location
    return MultiTracker(trackers), wandb_dir


def use_compilation_cache(directory: str) -> None:
    """Point JAX's persistent compilation cache at `directory`, caching every program (the
    default skips those that compile in under a second: all of a small model's)."""
    path = str(Path(directory).expanduser().absolute())
    if jax.config.jax_compilation_cache_dir != path:
        compilation_cache.reset_cache()
        compilation_cache.set_cache_dir(path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in to_host(metrics).items()}


def check_finite(metrics: dict[str, float], step: int, trainer: TrainerConfig,
                 checkpointer: Checkpointer) -> None:
    """Stop on a skipped (non-finite) step unless trainer.nonfinite=skip allows it."""
    if not metrics["nonfinite"]:
        return
    skipped = int(metrics["skipped_steps"])
    if trainer.nonfinite == "skip" and skipped <= trainer.max_skipped_steps:
        return
    latest = checkpointer.latest_step()
    last_good = "none yet" if latest is None else str(checkpointer.directory / str(latest))
    cause = (f"{skipped} steps skipped (more than trainer.max_skipped_steps="
             f"{trainer.max_skipped_steps})" if trainer.nonfinite == "skip" else
             "set trainer.nonfinite=skip to skip such steps")
    raise FloatingPointError(
        f"non-finite training step {step} (loss {metrics['loss']}, gradient norm "
        f"{metrics['grad_norm']}); its update was not applied. Last good checkpoint: {last_good}. "
        f"Lower optim.lr or raise optim.warmup_steps, or {cause}")


def train(cfg: TrainConfig, run_dir: Path | str, job_name: str | None = None) -> TrainResult:
    """Train (or resume) the run in `run_dir`. A run that already reached trainer.steps (its
    finished marker says so) returns its stored result: relaunched sweeps skip finished jobs."""
    initialize_distributed(cfg.mesh)  # before anything touches the devices
    run_dir = Path(run_dir).absolute()
    prepared = prepare(cfg, run_dir)
    finished = RunDir(run_dir).finished
    if finished is not None and finished["step"] >= cfg.trainer.steps:
        return finished_result(run_dir, finished)
    lock = RunLock(run_dir) if is_main_process() else contextlib.nullcontext()
    with lock, use_mesh(prepared.mesh), SaveTriggers(cfg.trainer.checkpoint_minutes) as triggers:
        result = _train(cfg, run_dir, job_name, prepared, triggers)
    if is_main_process():
        write_finished(run_dir, result.record())
    return result


def _train(cfg: TrainConfig, run_dir: Path, job_name: str | None, prepared: Prepared,
           triggers: SaveTriggers) -> TrainResult:
    task, objective, model_cfg, mesh = (prepared.task, prepared.objective, prepared.model_cfg,
                                        prepared.mesh)
    trainer = cfg.trainer
    checkpointer = Checkpointer(run_dir / "checkpoints", trainer.keep_checkpoints,
                                trainer.checkpoint_every, keep_best=trainer.keep_best,
                                best_metric=trainer.best_metric, best_mode=trainer.best_direction)
    latest = checkpointer.latest_meta()
    if latest is not None:  # refuse another model's checkpoint before building anything
        check_compatible(latest[1]["model"], to_dict(model_cfg), checkpointer.directory)
    if is_main_process() and task.tokenizer is not None:
        save_tokenizer(task.tokenizer, run_dir / "tokenizer.json")

    if trainer.compilation_cache_dir:
        use_compilation_cache(trainer.compilation_cache_dir)
    tx = make_optimizer(cfg.optim, trainer.steps, freeze_plan_for(cfg.finetune, model_cfg))
    schedule = make_schedule(cfg.optim, trainer.steps)
    layout = state_layout(model_cfg, tx, cfg.seed, mesh)  # shapes + shardings, no arrays yet
    init_plan = None
    if cfg.finetune.init_from and latest is not None:
        log.info("resuming %s from step %d: finetune.init_from=%s is ignored",
                 run_dir, latest[0], cfg.finetune.init_from)
    elif cfg.finetune.init_from:  # read and matched before anything compiles
        init_plan = plan_init(cfg.finetune, model_cfg, task.tokenizer, layout.abstract.params)
    graphdef, rest = layout.graphdef, layout.rest
    shardings = StepShardings(layout.shardings, batch_sharding(mesh), replicated(mesh))
    data_iter = train_iterator(task, objective, trainer.batch_size, cfg.seed,
                               rows=process_rows(trainer.batch_size))
    # what shapes the optimizer state: recorded with every checkpoint, named when resuming fails
    optimizer_settings = {"optim": to_dict(cfg.optim), "finetune": to_dict(cfg.finetune)}
    # restored straight into this mesh's shards, whatever wrote it; past corrupt checkpoints
    try:
        restored = checkpointer.restore_latest(with_shardings(layout.abstract, layout.shardings))
    except StateMismatch as err:
        saved_meta = latest[1] if latest else {}
        raise UserError(explain_state_mismatch(err, saved_meta, optimizer_settings)) from err
    if restored is not None:
        state, data_state, _ = restored
        data_iter.set_state(data_state)
    else:
        state = init_train_state(model_cfg, tx, cfg.seed, layout.shardings)
        if init_plan is not None:
            state = apply_init(state, init_plan)
    start_step = int(state.step)

    n_params = count_params(state.params)
    config = {
        **to_dict(cfg), "model": to_dict(model_cfg), "n_params": n_params,
        "job_name": job_name, "objective": objective.name, **run_metadata(),
        **({"init_from": init_plan.report()} if init_plan else {}),
    }
    tracker, wandb_dir = make_tracker(cfg, run_dir, start_step, config)
    meta = {"model": to_dict(model_cfg), "n_params": n_params, "objective": objective.name,
            **optimizer_settings}

    train_step = make_train_step(graphdef, rest, tx, schedule, objective,
                                 grad_accum=trainer.grad_accum, shardings=shardings)
    eval_step = make_eval_step(graphdef, rest, objective)
    heldout = objective.eval_set(task)
    every = trainer.diagnostics_every
    diagnose = make_diagnostics(graphdef, rest, tx, objective) if every else None

    completions: list[str] = []

    def evaluate(step: int) -> dict[str, float]:
        nonlocal completions
        metrics = eval_loss(eval_step, state.params, heldout, trainer.eval_batch_size)
        if objective.text_answers:  # answers as text, checked by the task
            model = nnx.merge(graphdef, state.params, rest)
            completions = objective.greedy_answers(model, heldout, task, trainer.eval_batch_size)
            metrics.update(exact_match(task, heldout, completions))
        tracker.log(metrics, step, "eval")
        return metrics

    tokens_per_step = trainer.batch_size * objective.max_positions(task)
    pending_diagnostics: tuple[int, dict] | None = None  # read after the update is dispatched
    last_time, last_step = time.perf_counter(), start_step
    progress = tqdm(total=trainer.steps, initial=start_step,
                    disable=not (trainer.progress and is_main_process()),
                    desc="train", unit="step", dynamic_ncols=True)
    # step N's metrics, read once step N+1 is dispatched, so the device never waits on the host
    pending: tuple[int, dict] | None = None

    def flush() -> None:
        """Log pending diagnostics; check the pending step for a skipped (non-finite) update,
        and log it on log steps (and whenever it was skipped)."""
        nonlocal pending, pending_diagnostics, last_time, last_step
        if pending_diagnostics is not None:
            tracker.log(diagnostics_metrics(pending_diagnostics[1]), pending_diagnostics[0],
                        "diagnostics")
            pending_diagnostics = None
        if pending is None:
            return
        step, device_metrics = pending
        pending = None
        metrics = _floats(device_metrics)
        if not (metrics["nonfinite"] or step % trainer.log_every == 0 or step == trainer.steps):
            return
        now = time.perf_counter()
        metrics["tokens_per_s"] = tokens_per_step * (step - last_step) / max(now - last_time, 1e-9)
        last_time, last_step = now, step
        tracker.log(metrics, step, "train")  # a skipped step is part of the run's record
        progress.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        check_finite(metrics, step, trainer, checkpointer)

    def save(step: int, evaluated: dict[str, float] | None = None) -> None:
        checkpointer.save(step, state, data_iter.get_state(), meta, eval_metrics=evaluated,
                          force=True)
        triggers.saved()

    eval_metrics: dict[str, float] = {}
    try:
        for step in range(start_step + 1, trainer.steps + 1):
            batch = global_batch(next(data_iter), mesh, trainer.batch_size)
            taken = step - 1  # updates so far; a resumed run leaves its restored step to the first run
            if diagnose is not None and taken % every == 0 and not taken == start_step > 0:
                pending_diagnostics = (taken, diagnose(state, batch))  # before donating state
            state, metrics = train_step(state, batch)
            flush()
            pending = (step, metrics)
            progress.update(1)
            evaluated = None
            if trainer.eval_every and (step % trainer.eval_every == 0 or step == trainer.steps):
                flush()
                eval_metrics = evaluated = evaluate(step)
                score = ("exact match", eval_metrics["exact_match"]) if "exact_match" in eval_metrics \
                    else ("accuracy", eval_metrics["accuracy"])
                if is_main_process():
                    progress.write(f"step {step}: eval loss {eval_metrics['loss']:.4f}, "
                                   f"{score[0]} {score[1]:.3f}")
            preempted = triggers.preempted(step)
            if (checkpointer.should_save(step) or step == trainer.steps or preempted
                    or (evaluated and trainer.keep_best) or triggers.time_to_save()):
                flush()  # never checkpoint a step before its finiteness is known
                save(step, evaluated)
            if preempted:
                checkpointer.wait()
                triggers.forward()
                raise Preempted(f"stopped by {triggers.signal_name} at step {step} after saving "
                                f"{checkpointer.directory / str(step)}: rerun the same command "
                                "to resume", triggers.signal or signal.SIGTERM)
        flush()
        if not eval_metrics and trainer.eval_every:  # resumed a finished run: evaluate it
            eval_metrics = evaluate(start_step)
        checkpointer.wait()
        samples = [  # a few held-out completions for a human to look at
            (task.prompt(p), text, task.answer(p), task.check(p, text))
            for p, text in list(zip(heldout.problems, completions))[: trainer.num_samples]
        ]
        tracker.summary({"step": int(state.step), **{f"eval/{k}": v for k, v in eval_metrics.items()}})
    finally:
        progress.close()
        checkpointer.close()
        tracker.finish()
    return TrainResult(run_dir, run_dir / METRICS, wandb_dir, int(state.step), objective.name,
                       eval_metrics, samples,
                       init_report=init_plan.report() if init_plan else None)

