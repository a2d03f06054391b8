"""The training loop: build or restore state, run jitted steps, log, evaluate, checkpoint."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache
from tqdm import tqdm

from jaxformer.config import ConfigError, ModelConfig, TrainConfig, to_dict
from jaxformer.data.pipeline import eval_set, train_iterator
from jaxformer.data.tasks import Task, build_task
from jaxformer.data.tokenizers import save_tokenizer
from jaxformer.data.vectors import TeacherTask
from jaxformer.diagnostics import diagnostics_metrics, make_diagnostics
from jaxformer.evaluation import eval_loss, exact_match, greedy_completions
from jaxformer.models import build_model, resolve_model_config
from jaxformer.objectives import objective_for
from jaxformer.run_info import run_metadata
from jaxformer.tracking import JsonlTracker, MultiTracker, Tracker, WandbTracker
from jaxformer.training.checkpoint import Checkpointer, check_compatible
from jaxformer.training.optim import make_optimizer, make_schedule
from jaxformer.training.state import count_params, create_train_state, split_model
from jaxformer.training.step import make_eval_step, make_train_step


@dataclass
class TrainResult:
    run_dir: Path
    metrics_path: Path
    wandb_dir: str | None
    step: int
    objective: str
    eval_metrics: dict[str, float]
    samples: list[tuple[str, str, str, bool]]  # (prompt, completion, expected, correct)


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
    task: Task | TeacherTask
    objective: str
    model_cfg: ModelConfig


def prepare(cfg: TrainConfig, run_dir: Path) -> Prepared:
    """Everything checkable before compiling: task, objective, model sizes, run dir."""
    check_writable(run_dir)
    task = build_task(cfg.task)
    objective = objective_for(cfg.model.kind, task.num_classes > 0)
    vector_task = task.tokenizer is None
    model_cfg = resolve_model_config(
        cfg.model, None if vector_task else task.tokenizer.get_vocab_size(),
        task.num_classes if objective in ("classification", "vector_classification") else 0,
        task.input_dim if vector_task else None,
    )
    needed = task.max_positions(objective)
    if needed > model_cfg.max_len:
        raise ConfigError(
            f"task {task.cfg.name} needs {needed} positions for the {objective} objective but "
            f"model.max_len={model_cfg.max_len}: set model.max_len>={needed} or shorten the task"
        )
    return Prepared(task, objective, model_cfg)


def make_tracker(cfg: TrainConfig, run_dir: Path, resume_step: int, config: dict) -> tuple[Tracker, str | None]:
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


def use_compilation_cache(directory: str) -> None:
    """Point JAX's persistent compilation cache at `directory`, caching every program (the
    default skips those that compile in under a second: all of a small model's)."""
    path = str(Path(directory).expanduser().absolute())
    if jax.config.jax_compilation_cache_dir != path:
        compilation_cache.reset_cache()
        compilation_cache.set_cache_dir(path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in jax.device_get(metrics).items()}


def train(cfg: TrainConfig, run_dir: Path | str, job_name: str | None = None) -> TrainResult:
    run_dir = Path(run_dir).absolute()
    prepared = prepare(cfg, run_dir)
    task, objective, model_cfg = prepared.task, prepared.objective, prepared.model_cfg
    trainer = cfg.trainer
    checkpointer = Checkpointer(run_dir / "checkpoints", trainer.keep_checkpoints,
                                trainer.checkpoint_every)
    latest = checkpointer.latest_step()
    if latest is not None:  # refuse another model's checkpoint before building anything
        check_compatible(checkpointer.read_meta(latest)["model"], to_dict(model_cfg),
                         checkpointer.directory)
    if task.tokenizer is not None:
        save_tokenizer(task.tokenizer, run_dir / "tokenizer.json")

    if trainer.compilation_cache_dir:
        use_compilation_cache(trainer.compilation_cache_dir)
    tx = make_optimizer(cfg.optim, trainer.steps)
    schedule = make_schedule(cfg.optim, trainer.steps)
    # Abstract first: shapes come from eval_shape; real arrays are made once, or restored.
    abstract_model = nnx.eval_shape(lambda: build_model(model_cfg, cfg.seed))
    graphdef, abstract_params, rest = split_model(abstract_model)
    abstract_state = jax.eval_shape(lambda p: create_train_state(p, tx, cfg.seed), abstract_params)
    data_iter = train_iterator(task, objective, trainer.batch_size, cfg.seed)
    if latest is not None:
        state, data_state = checkpointer.restore(latest, abstract_state)
        data_iter.set_state(data_state)
    else:
        state = jax.jit(
            lambda: create_train_state(split_model(build_model(model_cfg, cfg.seed))[1], tx, cfg.seed)
        )()
    start_step = int(state.step)

    n_params = count_params(state.params)
    config = {
        **to_dict(cfg), "model": to_dict(model_cfg), "n_params": n_params,
        "job_name": job_name, "objective": objective, **run_metadata(),
    }
    tracker, wandb_dir = make_tracker(cfg, run_dir, start_step, config)
    meta = {"model": to_dict(model_cfg), "n_params": n_params, "objective": objective}

    train_step = make_train_step(graphdef, rest, tx, schedule, objective)
    eval_step = make_eval_step(graphdef, rest, objective)
    heldout = eval_set(task, objective)
    every = trainer.diagnostics_every
    diagnose = make_diagnostics(graphdef, rest, tx, objective) if every else None

    completions: list[str] = []

    def evaluate(step: int) -> dict[str, float]:
        nonlocal completions
        metrics = eval_loss(eval_step, state.params, heldout, trainer.eval_batch_size)
        if task.tokenizer is not None:  # answers as text, checked by the task
            model = nnx.merge(graphdef, state.params, rest)
            completions = greedy_completions(model, heldout, task, objective, trainer.eval_batch_size)
            metrics.update(exact_match(task, heldout, completions))
        tracker.log(metrics, step, "eval")
        return metrics

    tokens_per_step = trainer.batch_size * task.max_positions(objective)
    pending: tuple[int, dict] | None = None  # step N's metrics, read after step N+1 is dispatched
    pending_diagnostics: tuple[int, dict] | None = None  # read after the update is dispatched
    last_time, last_step = time.perf_counter(), start_step
    progress = tqdm(total=trainer.steps, initial=start_step, disable=not trainer.progress,
                    desc="train", unit="step", dynamic_ncols=True)

    def flush() -> None:
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
        if not math.isfinite(metrics["loss"]):
            tracker.log(metrics, step, "train")  # the divergence is part of the run's record
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
            batch = next(data_iter)
            taken = step - 1  # updates so far; a resumed run leaves its restored step to the first run
            if diagnose is not None and taken % every == 0 and not taken == start_step > 0:
                pending_diagnostics = (taken, diagnose(state, batch))  # before donating state
            state, metrics = train_step(state, batch)
            flush()
            if step % trainer.log_every == 0 or step == trainer.steps:
                pending = (step, metrics)
            progress.update(1)
            if step % trainer.eval_every == 0 or step == trainer.steps:
                flush()
                eval_metrics = evaluate(step)
                score = ("exact match", eval_metrics["exact_match"]) if "exact_match" in eval_metrics \
                    else ("accuracy", eval_metrics["accuracy"])
                progress.write(f"step {step}: eval loss {eval_metrics['loss']:.4f}, "
                               f"{score[0]} {score[1]:.3f}")
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
                       eval_metrics, samples)

