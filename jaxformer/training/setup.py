"""A run before its first step. `prepare`: everything checkable before compiling (task, objective,
model sizes, mesh, run dir). `set_up`: the train state (restored from the latest checkpoint, else
fresh or from finetune.init_from), the data position, the jitted steps and the trackers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grain
import jax
from flax import nnx
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import Mesh

from jaxformer.config import TEXT_TASKS, ModelConfig, TrainConfig, to_dict
from jaxformer.data.pipeline import train_iterator
from jaxformer.data.prepare import PrepareConfig
from jaxformer.data.prepare import prepare as prepare_corpus
from jaxformer.data.tasks import Task, build_task
from jaxformer.data.tokenizers import save_tokenizer, tokenizer_sha256
from jaxformer.data.vectors import TeacherTask
from jaxformer.errors import UserError
from jaxformer.models import count_params
from jaxformer.objectives import EvalSet, Objective, objective_for
from jaxformer.parallel import (
    batch_sharding,
    data_parallel_size,
    is_main_process,
    make_mesh,
    process_rows,
    replicated,
    with_shardings,
)
from jaxformer.runs import CHECKPOINTS, METRICS, TOKENIZER
from jaxformer.tracking import JsonlTracker, MultiTracker, Tracker, WandbTracker, run_metadata
from jaxformer.training.checkpoint import (
    Checkpointer,
    StateMismatch,
    check_compatible,
    explain_state_mismatch,
)
from jaxformer.training.diagnostics import make_diagnostics
from jaxformer.training.finetune import freeze_plan_for
from jaxformer.training.init_from import InitPlan, apply_init, plan_init
from jaxformer.training.optim import make_optimizer, make_schedule
from jaxformer.training.run_dir import check_writable
from jaxformer.training.state import TrainState, init_train_state, state_layout
from jaxformer.training.step import StepShardings, make_eval_step, make_train_step
from jaxformer.training.throughput import Peak, device_peak
from jaxformer.training.train_log import StepCost

log = logging.getLogger(__name__)


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
    if model_cfg.mlp_hidden % tensor:
        raise UserError(f"the MLP's hidden width {model_cfg.mlp_hidden} (model.d_ff="
                        f"{model_cfg.d_ff}, model.mlp={model_cfg.mlp}) is not divisible by "
                        f"mesh.tensor={tensor}")


def prepare(cfg: TrainConfig, run_dir: Path) -> Prepared:
    """Everything checkable before compiling: task, objective, model sizes, mesh, run dir."""
    if is_main_process():
        check_writable(run_dir)
    mesh = make_mesh(cfg.mesh)
    if cfg.task.name in TEXT_TASKS:
        ensure_corpus(cfg)
    task = build_task(cfg.task)
    objective = objective_for(cfg.model, task)
    model_cfg = objective.model_config(cfg.model, task)
    check_parallelism(cfg, model_cfg, mesh)
    if (cfg.trainer.keep_best and not objective.text_answers
            and cfg.trainer.best_metric.startswith("exact_match")):
        raise UserError(f"trainer.best_metric={cfg.trainer.best_metric} does not exist for the "
                        f"{task.cfg.name} task (no text answers): use loss or accuracy")
    return Prepared(task, objective, model_cfg, mesh)


def check_same_tokenizer(saved: str | None, now: str | None, cfg: TrainConfig,
                         where: Path) -> None:
    """Refuse to resume on tokens of another tokenizer than the checkpoint's (a corpus prepared
    again with other settings): the same ids would mean other text."""
    if saved is None or saved == now:
        return  # checkpoints from before tokenizers were recorded are not checked
    source = (f"the shards in task.data_dir={cfg.task.data_dir} were made with"
              if cfg.task.name in TEXT_TASKS else f"task {cfg.task.name} now has")
    raise UserError(f"{source} another tokenizer than the checkpoints in {where} (sha256 "
                    f"{saved[:12]} there, {(now or 'none')[:12]} now): train on the corpus they "
                    "were made with, or use a new hydra.run.dir")


def ensure_corpus(cfg: TrainConfig) -> None:
    """task=text on the data group's corpus (task.data_dir is data.out_dir, as conf/task/text.yaml
    sets it): prepare it when it is missing or stale, as `python -m jaxformer.prepare` would (a
    check of a second when it is up to date). Process 0 prepares; the others wait for it."""
    if Path(cfg.task.data_dir).absolute() != Path(cfg.data.out_dir).absolute():
        return  # a corpus prepared elsewhere: used as it is
    if is_main_process():
        done = prepare_corpus(PrepareConfig(cfg.data, cfg.tokenizer))
        if done.built:
            splits = done.manifest["splits"]
            log.info("prepared %s in %.1f s (%s): %s", done.out_dir, done.seconds, done.reason,
                     ", ".join(f"{name} {split['documents']} documents, {split['tokens']} tokens"
                               for name, split in splits.items()))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxformer corpus prepared")


def use_compilation_cache(directory: str) -> None:
    """Point JAX's persistent compilation cache at `directory`, caching every program (the
    default skips those that compile in under a second: all of a small model's)."""
    path = str(Path(directory).expanduser().absolute())
    if jax.config.jax_compilation_cache_dir != path:
        compilation_cache.reset_cache()
        compilation_cache.set_cache_dir(path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def make_tracker(cfg: TrainConfig, run_dir: Path, resume_step: int,
                 config: dict) -> tuple[Tracker, str | None]:
    if not is_main_process():  # one writer per run, whatever the process count
        return MultiTracker([]), None
    trackers: list[Tracker] = [JsonlTracker(run_dir / METRICS, resume_step)]
    wandb_dir = None
    wb = cfg.logger.wandb
    settings = wb.resolved(run_dir)
    if settings["mode"] != "disabled":
        wandb_tracker = WandbTracker(run_dir, settings, wb.group or cfg.name,
                                     config.get("job_name") or run_dir.name, wb.tags, config)
        trackers.append(wandb_tracker)
        wandb_dir = wandb_tracker.location
    return MultiTracker(trackers), wandb_dir


@dataclass
class TrainSetup:
    """What the step loop starts from."""

    state: TrainState  # restored, or fresh (from finetune.init_from when set)
    start_step: int  # updates the state has taken: > 0 when resuming
    data_iter: grain.DatasetIterator  # at the restored data position
    checkpointer: Checkpointer
    meta: dict  # recorded with every checkpoint: model, objective, optimizer settings
    init_plan: InitPlan | None  # what finetune.init_from loaded (None: nothing)
    train_step: Callable
    eval_step: Callable
    diagnose: Callable | None  # None: trainer.diagnostics_every=0
    graphdef: nnx.GraphDef
    rest: nnx.State
    heldout: EvalSet
    tracker: Tracker
    wandb_dir: str | None
    step_cost: StepCost  # what the train records' throughput fields divide

    @property
    def resumed(self) -> bool:
        return self.start_step > 0

    @property
    def init_report(self) -> list[str] | None:
        return self.init_plan.report() if self.init_plan else None


def set_up(cfg: TrainConfig, run_dir: Path, job_name: str | None, prepared: Prepared) -> TrainSetup:
    task, objective, model_cfg, mesh = (prepared.task, prepared.objective, prepared.model_cfg,
                                        prepared.mesh)
    trainer = cfg.trainer
    checkpointer = Checkpointer(run_dir / CHECKPOINTS, trainer.keep_checkpoints,
                                trainer.checkpoint_every, keep_best=trainer.keep_best,
                                best_metric=trainer.best_metric, best_mode=trainer.best_direction)
    latest = checkpointer.latest_meta()
    tokens_by = None if task.tokenizer is None else tokenizer_sha256(task.tokenizer)
    if latest is not None:  # refuse another model's checkpoint before building anything
        check_compatible(latest[1]["model"], to_dict(model_cfg), checkpointer.directory)
        check_same_tokenizer(latest[1].get("tokenizer_sha256"), tokens_by, cfg,
                             checkpointer.directory)
    if is_main_process() and task.tokenizer is not None:
        save_tokenizer(task.tokenizer, run_dir / TOKENIZER)

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

    graphdef, rest = layout.graphdef, layout.rest
    shardings = StepShardings(layout.shardings, batch_sharding(mesh), replicated(mesh))
    train_step = make_train_step(graphdef, rest, tx, schedule, objective,
                                 grad_accum=trainer.grad_accum, shardings=shardings,
                                 z_loss=cfg.optim.z_loss)
    diagnose = (make_diagnostics(graphdef, rest, tx, objective, cfg.optim.z_loss)
                if trainer.diagnostics_every else None)
    heldout = objective.eval_set(task)

    n_params = count_params(state.params)
    meta = {"model": to_dict(model_cfg), "n_params": n_params, "objective": objective.name,
            "tokenizer_sha256": tokens_by, **optimizer_settings}
    step_cost, peak = train_step_cost(cfg, prepared)
    config = {  # the run's wandb config
        **to_dict(cfg), "model": to_dict(model_cfg), "n_params": n_params,
        "job_name": job_name, "objective": objective.name, **run_metadata(),
        "throughput": {"tokens_per_step": step_cost.tokens, "model_flops_per_step": step_cost.flops,
                       "peak_flops": step_cost.peak_flops, "peak": peak.source},
    }
    if init_plan is not None:
        config["init_from"] = init_plan.report()
    tracker, wandb_dir = make_tracker(cfg, run_dir, start_step, config)  # last: nothing fails after
    return TrainSetup(state, start_step, data_iter, checkpointer, meta, init_plan, train_step,
                      make_eval_step(graphdef, rest, objective), diagnose, graphdef, rest, heldout,
                      tracker, wandb_dir, step_cost)


def train_step_cost(cfg: TrainConfig, prepared: Prepared) -> tuple[StepCost, Peak]:
    """Tokens and model FLOPs of one optimizer step, and the peak MFU is measured against."""
    batch = cfg.trainer.batch_size
    per_example = prepared.objective.train_flops_per_example(prepared.model_cfg, prepared.task)
    peak = device_peak(cfg.trainer.peak_flops)
    return StepCost(batch * prepared.objective.max_positions(prepared.task),
                    None if per_example is None else batch * per_example, peak.flops), peak
