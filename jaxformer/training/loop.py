"""The training loop: build or restore state, run jitted steps, log, evaluate, checkpoint."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from jaxformer.config import ConfigError, ModelConfig, TrainConfig, to_dict
from jaxformer.data.pipeline import eval_set, train_iterator
from jaxformer.data.tasks import Task, build_task
from jaxformer.data.tokenizers import save_tokenizer
from jaxformer.evaluation import eval_loss, exact_match, greedy_completions
from jaxformer.models import resolve_model_config
from jaxformer.objectives import objective_for
from jaxformer.parallel import (
    batch_sharding, data_parallel_size, global_batch, initialize_distributed, is_main_process,
    make_mesh, process_rows, replicated, to_host, use_mesh, with_shardings,
)
from jaxformer.run_info import run_metadata
from jaxformer.tracking import JsonlTracker, MultiTracker, Tracker, WandbTracker
from jaxformer.training.checkpoint import Checkpointer, check_compatible
from jaxformer.training.finetune import make_train_optimizer
from jaxformer.training.init_from import apply_init, plan_init
from jaxformer.training.optim import make_schedule
from jaxformer.training.state import count_params, init_train_state, state_layout
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
    init_report: list[str] | None = None  # what finetune.init_from loaded (None: nothing)


log = logging.getLogger(__name__)


def check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_probe"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"run dir {run_dir} is not writable ({err.strerror}): set hydra.run.dir to a writable path"
        ) from None


@dataclass
class Prepared:
    task: Task
    objective: str
    model_cfg: ModelConfig
    mesh: Mesh


def check_parallelism(cfg: TrainConfig, model_cfg: ModelConfig, mesh: Mesh) -> None:
    """The batch splits over the data axes (and micro-batches), heads over the tensor axis."""
    trainer, data_ways, tensor = cfg.trainer, data_parallel_size(mesh), mesh.shape["tensor"]
    if trainer.batch_size % (trainer.grad_accum * data_ways):
        raise ConfigError(
            f"trainer.batch_size={trainer.batch_size} does not split into "
            f"trainer.grad_accum={trainer.grad_accum} micro-batches over the {data_ways} "
            f"data-parallel devices (mesh.data x mesh.fsdp): make batch_size a multiple of "
            f"{trainer.grad_accum * data_ways}")
    if trainer.batch_size % jax.process_count():
        raise ConfigError(f"trainer.batch_size={trainer.batch_size} does not split over "
                          f"{jax.process_count()} processes: make it a multiple of that")
    if model_cfg.n_heads % tensor:
        raise ConfigError(f"model.n_heads={model_cfg.n_heads} is not divisible by "
                          f"mesh.tensor={tensor}: tensor parallelism splits whole heads")
    if model_cfg.d_ff % tensor:
        raise ConfigError(f"model.d_ff={model_cfg.d_ff} is not divisible by mesh.tensor={tensor}")


def prepare(cfg: TrainConfig, run_dir: Path) -> Prepared:
    """Everything checkable before compiling: task, objective, model sizes, mesh, run dir."""
    if is_main_process():
        check_writable(run_dir)
    mesh = make_mesh(cfg.mesh)
    task = build_task(cfg.task)
    objective = objective_for(cfg.model.kind, task.num_classes > 0, cfg.model.num_classes)
    if cfg.model.kind == "decoder" and cfg.model.num_classes and objective != "classification":
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} adds a classifier to the "
                          f"decoder, but task {task.cfg.name} is not a classification task: use "
                          "task=is_sorted or model.num_classes=0")
    model_cfg = resolve_model_config(
        cfg.model, task.tokenizer.get_vocab_size(),
        task.num_classes if objective == "classification" else 0,
    )
    needed = task.max_positions(objective)
    if needed > model_cfg.max_len:
        raise ConfigError(
            f"task {task.cfg.name} needs {needed} positions for the {objective} objective but "
            f"model.max_len={model_cfg.max_len}: set model.max_len>={needed} or shorten the task"
        )
    check_parallelism(cfg, model_cfg, mesh)
    return Prepared(task, objective, model_cfg, mesh)


def make_tracker(cfg: TrainConfig, run_dir: Path, resume_step: int, config: dict) -> tuple[Tracker, str | None]:
    if not is_main_process():  # one writer per run, whatever the process count
        return MultiTracker([]), None
    trackers: list[Tracker] = [JsonlTracker(run_dir / "metrics.jsonl", resume_step)]
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


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in to_host(metrics).items()}


def train(cfg: TrainConfig, run_dir: Path | str, job_name: str | None = None) -> TrainResult:
    initialize_distributed(cfg.mesh)  # before anything touches the devices
    run_dir = Path(run_dir).absolute()
    prepared = prepare(cfg, run_dir)
    with use_mesh(prepared.mesh):
        return _train(cfg, run_dir, job_name, prepared)


def _train(cfg: TrainConfig, run_dir: Path, job_name: str | None,
           prepared: Prepared) -> TrainResult:
    task, objective, model_cfg, mesh = (prepared.task, prepared.objective, prepared.model_cfg,
                                        prepared.mesh)
    trainer = cfg.trainer
    checkpointer = Checkpointer(run_dir / "checkpoints", trainer.keep_checkpoints,
                                trainer.checkpoint_every)
    latest = checkpointer.latest_step()
    if latest is not None:  # refuse another model's checkpoint before building anything
        check_compatible(checkpointer.read_meta(latest)["model"], to_dict(model_cfg),
                         checkpointer.directory)
    if is_main_process():
        save_tokenizer(task.tokenizer, run_dir / "tokenizer.json")

    tx = make_train_optimizer(cfg.optim, cfg.finetune, model_cfg, trainer.steps)
    schedule = make_schedule(cfg.optim, trainer.steps)
    layout = state_layout(model_cfg, tx, cfg.seed, mesh)  # shapes + shardings, no arrays yet
    init_plan = None
    if cfg.finetune.init_from and latest is not None:
        log.info("resuming %s from step %d: finetune.init_from=%s is ignored",
                 run_dir, latest, cfg.finetune.init_from)
    elif cfg.finetune.init_from:  # read and matched before anything compiles
        init_plan = plan_init(cfg.finetune, model_cfg, task.tokenizer, layout.abstract.params)
    graphdef, rest = layout.graphdef, layout.rest
    shardings = StepShardings(layout.shardings, batch_sharding(mesh), replicated(mesh))
    data_iter = train_iterator(task, objective, trainer.batch_size, cfg.seed,
                               rows=process_rows(trainer.batch_size))
    if latest is not None:  # restored straight into this mesh's shards, whatever wrote it
        state, data_state = checkpointer.restore(
            latest, with_shardings(layout.abstract, layout.shardings))
        data_iter.set_state(data_state)
    else:
        state = init_train_state(model_cfg, tx, cfg.seed, layout.shardings)
        if init_plan is not None:
            state = apply_init(state, init_plan)
    start_step = int(state.step)

    n_params = count_params(state.params)
    config = {
        **to_dict(cfg), "model": to_dict(model_cfg), "n_params": n_params,
        "job_name": job_name, "objective": objective, **run_metadata(),
        **({"init_from": init_plan.report()} if init_plan else {}),
    }
    tracker, wandb_dir = make_tracker(cfg, run_dir, start_step, config)
    meta = {"model": to_dict(model_cfg), "n_params": n_params, "objective": objective}

    train_step = make_train_step(graphdef, rest, tx, schedule, objective,
                                 grad_accum=trainer.grad_accum, shardings=shardings)
    eval_step = make_eval_step(graphdef, rest, objective)
    heldout = eval_set(task, objective)

    completions: list[str] = []

    def evaluate(step: int) -> dict[str, float]:
        nonlocal completions
        model = nnx.merge(graphdef, state.params, rest)
        completions = greedy_completions(model, heldout, task, objective, trainer.eval_batch_size)
        metrics = {**eval_loss(eval_step, state.params, heldout, trainer.eval_batch_size),
                   **exact_match(task, heldout, completions)}
        tracker.log(metrics, step, "eval")
        return metrics

    tokens_per_step = trainer.batch_size * task.max_positions(objective)
    pending: tuple[int, dict] | None = None  # step N's metrics, read after step N+1 is dispatched
    last_time, last_step = time.perf_counter(), start_step
    progress = tqdm(total=trainer.steps, initial=start_step,
                    disable=not (trainer.progress and is_main_process()),
                    desc="train", unit="step", dynamic_ncols=True)

    def flush() -> None:
        nonlocal pending, last_time, last_step
        if pending is None:
            return
        step, device_metrics = pending
        pending = None
        metrics = _floats(device_metrics)
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(
                f"train loss is {metrics['loss']} at step {step}: lower optim.lr or raise "
                f"optim.warmup_steps (last good checkpoint: {checkpointer.latest_step()})"
            )
        now = time.perf_counter()
        metrics["tokens_per_s"] = tokens_per_step * (step - last_step) / max(now - last_time, 1e-9)
        last_time, last_step = now, step
        tracker.log(metrics, step, "train")
        progress.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")

    eval_metrics: dict[str, float] = {}
    try:
        for step in range(start_step + 1, trainer.steps + 1):
            batch = global_batch(next(data_iter), mesh, trainer.batch_size)
            state, metrics = train_step(state, batch)
            flush()
            if step % trainer.log_every == 0 or step == trainer.steps:
                pending = (step, metrics)
            progress.update(1)
            if step % trainer.eval_every == 0 or step == trainer.steps:
                flush()
                eval_metrics = evaluate(step)
                if is_main_process():
                    progress.write(f"step {step}: eval loss {eval_metrics['loss']:.4f}, "
                                   f"exact match {eval_metrics['exact_match']:.3f}")
            if checkpointer.should_save(step) or step == trainer.steps:
                checkpointer.save(step, state, data_iter.get_state(), meta, force=True)
        flush()
        if not eval_metrics:  # resumed an already finished run: evaluate what was restored
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
    return TrainResult(run_dir, run_dir / "metrics.jsonl", wandb_dir, int(state.step), objective,
                       eval_metrics, samples, init_plan.report() if init_plan else None)

