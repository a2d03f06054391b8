"""Typed config schemas (Hydra ConfigStore) and their validation.

The YAML files under `conf/` are merged onto these dataclasses, so an unknown key or a wrong type fails
at composition time; `OmegaConf.to_object` then builds the dataclasses and each `__post_init__` checks
values, raising `UserError` with one line that names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf

from jaxformer.config.checks import check_at_least, check_choice, check_positive
from jaxformer.config.model import (  # noqa: F401 (the model schema, imported from here too)
    ACTIVATIONS, ATTENTION_IMPLS, COMPUTES, DTYPES, INITS, MLP_TYPES, MODEL_KINDS, NORM_TYPES,
    NORMS, POOLINGS, POSITIONS, REMAT_POLICIES, RUNTIME, ModelConfig,
)
from jaxformer.errors import UserError

# `${stdlib:}` in a config: this interpreter's standard-library folder (the default corpus)
OmegaConf.register_new_resolver("stdlib", lambda: sysconfig.get_paths()["stdlib"], replace=True)

TOKEN_TASKS = ("addition", "reverse", "sort", "is_sorted")
VECTOR_TASKS = ("teacher",)  # real-valued feature vectors: the mlp's tasks
TEXT_TASKS = ("text",)  # token shards of a prepared corpus (python -m jaxformer.prepare)
TASKS = TOKEN_TASKS + VECTOR_TASKS + TEXT_TASKS
DOCUMENT_SPLITS = ("file", "blank_line")  # a text file is one document | one per blank-line block
SCHEDULES = ("cosine", "constant", "linear", "rsqrt", "wsd")  # see training/optim.py:make_schedule
OPTIMIZERS = ("adamw", "sgd", "adafactor", "lion", "muon")  # conf/optim/NAME.yaml each
WANDB_MODES = ("offline", "online", "disabled")
WANDB_ENV_ALIASES = {"dryrun": "offline", "run": "online"}  # older spellings wandb still reads
BEST_METRICS = ("loss", "accuracy", "exact_match")  # the eval metrics every objective reports
LOWER_IS_BETTER = ("loss", "bpb", "perplexity", "ppl", "error")  # metric name parts; others: higher


def lower_is_better(metric: str) -> bool:
    """How a metric improves, read from its name (eval/bpb, loss, exact_match_3, ...)."""
    return any(part in metric for part in LOWER_IS_BETTER)

PARAM_GROUPS = ("embeddings", "blocks", "head")  # see jaxformer/training/finetune.py
FINETUNE_MODES = ("full", "head_only")


@dataclass
class TaskConfig:
    """One schema for every task; each task reads the fields of its section."""

    name: str = "addition"
    # addition: "a+b=" -> digits of a + b
    min_digits: int = 1  # operands have between min_digits and max_digits digits
    max_digits: int = 3
    reverse_answer: bool = True  # answer digits least-significant first (Lee et al. 2023)
    pad_operands: bool = True  # zero-pad operands to max_digits and the answer to max_digits + 1
    # reverse, sort, is_sorted: sequences of min_length..max_length symbols from n_symbols
    min_length: int = 2
    max_length: int = 8
    n_symbols: int = 10  # the first n_symbols of 0-9a-z
    # every task
    train_size: Optional[int] = None  # unique training problems; None: sample all non-held-out ones
    eval_size: int = 500  # held-out problems used for evaluation
    split_seed: int = 1234  # fixes the held-out set independently of the run's seed
    mask_prob: float = 0.15  # encoder masked-LM: share of tokens to predict (80% <mask>, 10% random, 10% kept)
    # teacher: Gaussian feature vectors labelled by a fixed random teacher network (model.kind=mlp)
    input_dim: int = 16  # features per example
    num_classes: int = 4
    teacher_width: int = 32  # hidden units of the teacher
    # text: rows of seq_len tokens packed from the documents of a prepared corpus
    data_dir: Optional[str] = None  # the prepare output (manifest.json, tokenizer, shards)
    seq_len: int = 256  # tokens a row predicts (the model reads seq_len positions)
    document_masking: bool = True  # no attention across documents; positions restart per document
    noise_density: float = 0.15  # span corruption (encoder-decoder): share of tokens masked
    mean_span_length: float = 3.0  # span corruption: mean length of a masked span

    def __post_init__(self) -> None:
        check_choice("task", self, "name", TASKS)
        check_positive(
            "task", self, "min_digits", "max_digits", "eval_size", "min_length", "max_length",
            "input_dim", "teacher_width",
        )
        if self.min_digits > self.max_digits:
            raise UserError(
                f"task.min_digits={self.min_digits} exceeds task.max_digits={self.max_digits}"
            )
        if self.max_digits > 9:
            raise UserError(f"task.max_digits={self.max_digits} must be at most 9")
        if self.min_length > self.max_length:
            raise UserError(
                f"task.min_length={self.min_length} exceeds task.max_length={self.max_length}"
            )
        if not 2 <= self.n_symbols <= 36:
            raise UserError(f"task.n_symbols={self.n_symbols} must be between 2 and 36")
        if not 0.0 < self.mask_prob < 1.0:
            raise UserError(f"task.mask_prob={self.mask_prob} must be in (0, 1)")
        if self.num_classes < 2:
            raise UserError(f"task.num_classes={self.num_classes} must be at least 2")
        if self.train_size is not None:
            check_positive("task", self, "train_size")
        check_positive("task", self, "seq_len", "mean_span_length")
        if not 0.0 < self.noise_density < 1.0:
            raise UserError(f"task.noise_density={self.noise_density} must be in (0, 1)")
        if self.name in TEXT_TASKS and not self.data_dir:
            raise UserError("task=text needs task.data_dir: the out_dir of python -m "
                            "jaxformer.prepare (data=python_stdlib prepares the default corpus)")


@dataclass
class DataConfig:
    """A text corpus for `python -m jaxformer.prepare`: files by glob -> documents -> a train and
    a validation split (by a seeded hash of each document) -> token shards in out_dir."""

    paths: list[str] = field(default_factory=list)  # globs; ${stdlib:} is Python's stdlib folder
    exclude: list[str] = field(default_factory=list)  # globs of files to leave out (* crosses /)
    out_dir: str = "data/corpus"  # manifest.json, tokenizer.json, {train,validation}.*.npy
    documents: str = "file"  # plain text files: one document per file | per blank-line block
    text_field: str = "text"  # .jsonl: the field holding the text; .parquet: the column
    validation_fraction: float = 0.05  # share of documents held out, decided per document
    split_seed: int = 0  # the hash seed deciding which documents are held out

    def __post_init__(self) -> None:
        check_choice("data", self, "documents", DOCUMENT_SPLITS)
        if not 0.0 < self.validation_fraction < 1.0:
            raise UserError(f"data.validation_fraction={self.validation_fraction} must be in (0, 1)")
        if not str(self.out_dir).strip():
            raise UserError("data.out_dir is empty: give the folder the shards go to")
        if not self.text_field:
            raise UserError("data.text_field is empty: name the jsonl field / parquet column")


@dataclass
class TokenizerConfig:
    """The tokenizer `python -m jaxformer.prepare` trains (a byte-level BPE on the training
    split) or loads (`path`: an existing tokenizer.json, e.g. GPT-2's)."""

    path: Optional[str] = None  # a tokenizer.json (or a folder holding one); None: train a BPE
    vocab_size: int = 8192  # BPE: the 256 bytes, the special tokens and merges up to this size
    min_frequency: int = 2  # BPE: a pair merges only if it occurs at least this often
    sentinels: int = 100  # <extra_id_0> ... for span corruption (T5)

    def __post_init__(self) -> None:
        check_positive("tokenizer", self, "vocab_size", "min_frequency")
        check_at_least("tokenizer", self, "sentinels")


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd | adafactor | lion | muon (training/optim.py:_optimizer)
    lr: float = 1e-3
    weight_decay: float = 0.1
    b1: float = 0.9  # adamw, lion, muon's AdamW (embeddings, heads, biases, norms)
    b2: float = 0.98  # adamw, lion, muon's AdamW
    eps: float = 1e-9  # adamw, muon's AdamW
    warmup_steps: int = 100
    # after a linear warmup: cosine | constant | linear (to lr * min_lr_ratio) | rsqrt
    # (lr * sqrt(warmup / step)) | wsd (constant, then linear to lr * min_lr_ratio at the end)
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine, linear, wsd)
    decay_fraction: float = 0.2  # wsd: the last fraction of the steps, in (0, 1], decays
    clip_norm: float = 1.0  # global-norm clipping; 0 disables it
    momentum: float = 0.9  # sgd: heavy-ball momentum (0: plain SGD); muon: its beta; adafactor: 0 = none
    nesterov: bool = False  # sgd, muon: Nesterov momentum
    # weight decay skips biases and norm scales; false: the embedding tables too (token,
    # positions, token types: every parameter named `embedding`)
    decay_embeddings: bool = True
    z_loss: float = 0.0  # PaLM's z-loss: adds z_loss * mean (log sum exp logits)^2 to the train loss

    def __post_init__(self) -> None:
        check_choice("optim", self, "name", OPTIMIZERS)
        check_choice("optim", self, "schedule", SCHEDULES)
        check_positive("optim", self, "lr")
        check_at_least("optim", self, "weight_decay", "warmup_steps", "clip_norm", "min_lr_ratio",
                        "eps", "z_loss")
        for name in ("b1", "b2", "momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"optim.{name}={getattr(self, name)} must be in [0, 1)")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise UserError(f"optim.decay_fraction={self.decay_fraction} must be in (0, 1]: the "
                            "fraction of the steps at the end of schedule=wsd that decays")


@dataclass
class TrainerConfig:
    steps: int = 2000
    batch_size: int = 64
    log_every: int = 50
    eval_every: int = 500  # and at the last step; 0: never evaluate (pure training / throughput)
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    eval_batch_size: int = 250
    num_samples: int = 4  # completions printed at the end of training
    progress: bool = True
    # micro-batches per optimizer step: batch_size is the global batch, split into grad_accum
    # sequential pieces whose gradients are averaged (same result, 1/grad_accum the activations)
    grad_accum: int = 1
    diagnostics_every: int = 0  # per-layer gradient/activation diagnostics at step 0 and every N steps; 0: off
    # persistent XLA cache: a job whose programs match an earlier job's loads them instead of
    # compiling (the jobs of a sweep share most programs); None: off
    compilation_cache_dir: Optional[str] = None
    checkpoint_minutes: Optional[float] = None  # also save when this much time has passed
    keep_best: int = 0  # also keep the best K checkpoints by best_metric (saved at every eval)
    best_metric: str = "loss"  # an eval metric: loss, accuracy, exact_match, exact_match_<bin>
    best_mode: str = "auto"  # min | max | auto (min for loss, max for the others)
    # a non-finite loss or gradient never reaches the parameters (the update is skipped inside the
    # step); then stop: end the run naming the step | skip: go on, counting skipped steps
    nonfinite: str = "stop"
    max_skipped_steps: int = 100  # nonfinite=skip: stop once more steps than this were skipped
    # MFU's denominator, FLOP/s per device; None: the datasheet bf16 peak of a known GPU/TPU, a
    # measured float32 matmul on CPU (training/throughput.py)
    peak_flops: Optional[float] = None

    def __post_init__(self) -> None:
        if self.peak_flops is not None:
            check_positive("trainer", self, "peak_flops")
        check_positive(
            "trainer", self, "steps", "batch_size", "log_every",
            "checkpoint_every", "keep_checkpoints", "eval_batch_size", "grad_accum",
        )
        check_at_least("trainer", self, "eval_every", hint=" (0: never)")
        if self.batch_size % self.grad_accum:
            raise UserError(
                f"trainer.batch_size={self.batch_size} is not divisible by "
                f"trainer.grad_accum={self.grad_accum}: the global batch splits into grad_accum "
                "equal micro-batches"
            )
        check_at_least("trainer", self, "num_samples", "diagnostics_every")
        if self.checkpoint_minutes is not None:
            check_positive("trainer", self, "checkpoint_minutes")
        check_at_least("trainer", self, "keep_best", "max_skipped_steps")
        if self.best_metric not in BEST_METRICS and not self.best_metric.startswith("exact_match_"):
            raise UserError(
                f"trainer.best_metric={self.best_metric!r} is not an eval metric: use one of "
                f"{', '.join(BEST_METRICS)} or exact_match_<difficulty bin>")
        check_choice("trainer", self, "best_mode", ("auto", "min", "max"))
        check_choice("trainer", self, "nonfinite", ("stop", "skip"))

    @property
    def best_direction(self) -> str:
        """min or max: how best_metric improves."""
        if self.best_mode != "auto":
            return self.best_mode
        return "min" if lower_is_better(self.best_metric) else "max"


@dataclass
class MeshConfig:
    """Device mesh (jaxformer/parallel.py): data x fsdp x tensor must equal the device count;
    one axis may be -1, meaning "the remaining devices"."""

    data: int = -1  # data-parallel replicas
    fsdp: int = 1  # data parallel whose replicas also shard parameters and optimizer state
    tensor: int = 1  # tensor parallel: attention heads and MLP hidden units split across devices
    # multi-host: auto initialises jax.distributed when a cluster is detected (SLURM with several
    # tasks, a TPU pod, JAX_COORDINATOR_ADDRESS) or coordinator_address is set; on | off force it
    distributed: str = "auto"
    coordinator_address: Optional[str] = None  # host:port of process 0
    num_processes: Optional[int] = None
    process_id: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("data", "fsdp", "tensor"):
            value = getattr(self, name)
            if value == 0 or value < -1:
                raise UserError(f"mesh.{name}={value} must be a positive device count or -1 "
                                "(the remaining devices)")
        check_choice("mesh", self, "distributed", ("auto", "on", "off"))
        check_at_least("mesh", self, "num_processes", "process_id")


@dataclass
class WandbConfig:
    """None: the environment's WANDB_MODE / WANDB_PROJECT / WANDB_ENTITY / WANDB_DIR, else the
    default (offline, jaxformer, your default entity, the run dir): a value set here (in a
    config file or an override) wins over the environment (tracking.py:wandb_settings)."""

    mode: Optional[str] = None  # offline | online | disabled
    project: Optional[str] = None
    entity: Optional[str] = None
    group: Optional[str] = None  # None: the experiment name
    tags: list[str] = field(default_factory=list)
    dir: Optional[str] = None  # where wandb/ goes

    def __post_init__(self) -> None:
        if self.mode is not None:
            check_choice("logger.wandb", self, "mode", WANDB_MODES)

    def resolved_mode(self) -> str:
        if self.mode is not None:
            return self.mode
        env = os.environ.get("WANDB_MODE") or "offline"
        mode = WANDB_ENV_ALIASES.get(env, env)
        if mode not in WANDB_MODES:
            raise UserError(f"WANDB_MODE={env!r} in the environment is not a wandb mode: use "
                            f"{', '.join(WANDB_MODES)}, or set logger.wandb.mode")
        return mode

    def resolved(self, run_dir: str) -> dict[str, Any]:
        """wandb.init's mode, project, entity and dir: this config's value, else the
        environment's, else the default (entity None: wandb's default entity)."""
        return {"mode": self.resolved_mode(),
                "project": self.project or os.environ.get("WANDB_PROJECT") or "jaxformer",
                "entity": self.entity or os.environ.get("WANDB_ENTITY") or None,
                "dir": self.dir or os.environ.get("WANDB_DIR") or str(run_dir)}


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)  # metrics.jsonl is always written


def check_sampling(temperature: float, top_k: int, top_p: float, prefix: str = "") -> None:
    """The decoding controls' ranges, checked by the config and by the decoding functions alike."""
    if not temperature >= 0.0:
        raise UserError(f"{prefix}temperature={temperature} must be >= 0 (0 is greedy)")
    if top_k < 0:
        raise UserError(f"{prefix}top_k={top_k} must be >= 0 (0 turns it off)")
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"{prefix}top_p={top_p} must be in (0, 1] (1 turns it off)")


@dataclass
class SamplingConfig:
    """Decoding controls of `jaxformer.sample` and `jaxformer.evaluate` (see jaxformer/models/decoding.py)."""

    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # keep the k most likely tokens; 0: off
    top_p: float = 1.0  # keep the smallest set reaching this probability; 1: off
    num_samples: int = 8  # completions per prompt
    max_new_tokens: Optional[int] = None  # None: sample fills the context; evaluate: the answer + <eos>
    beam_size: int = 0  # > 0: also beam search with this many beams (sample prints the beams)
    length_penalty: float = 0.0  # beam score = logprob / length ** length_penalty; 0: plain logprob
    seed: int = 0  # sample j of problem i draws from fold_in(fold_in(key(seed), i), j)
    batch_size: int = 64  # prompts per decoding call

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p, prefix="sampling.")
        check_at_least("sampling", self, "num_samples", minimum=1)
        check_at_least("sampling", self, "max_new_tokens", minimum=1,
                        hint=" (or null for the default)")
        check_at_least("sampling", self, "beam_size", hint=" (0: no beam search)")
        check_positive("sampling", self, "batch_size")

    def check_vocab(self, vocab_size: int) -> None:
        """What needs the model: top_k must not exceed its vocabulary."""
        if self.top_k > vocab_size:
            raise UserError(f"sampling.top_k={self.top_k} exceeds the model's vocabulary of "
                            f"{vocab_size} tokens: use top_k <= {vocab_size} (or 0 to turn it off)")


@dataclass
class LrMultipliers:
    """Per-group factors on optim.lr (the whole schedule scales)."""

    embeddings: float = 1.0
    blocks: float = 1.0
    head: float = 1.0


@dataclass
class FinetuneConfig:
    """Transfer learning (jaxformer/transfer.py, jaxformer/training/finetune.py). Parameter groups:
    embeddings (token table, which the decoder's LM head reuses; positions; token types),
    blocks (the layer stacks and their final norms), head (classifier, masked-LM head)."""

    init_from: Optional[str] = None  # a jaxformer run dir or a Hugging Face folder (BERT, GPT-2)
    init_step: Optional[int] = None  # run-dir checkpoint step; None: the latest
    allow_shape_mismatch: bool = False  # re-initialise (and report) params whose shape differs
    mode: str = "full"  # full | head_only (embeddings and blocks frozen)
    freeze: list[str] = field(default_factory=list)  # groups frozen: embeddings, blocks, head
    freeze_lower_blocks: int = 0  # the lowest N blocks of every stack are frozen
    lr_multipliers: LrMultipliers = field(default_factory=LrMultipliers)

    def __post_init__(self) -> None:
        check_choice("finetune", self, "mode", FINETUNE_MODES)
        if self.init_from is not None and not str(self.init_from).strip():
            raise UserError("finetune.init_from is empty: give a run dir or a Hugging Face "
                            "folder, or null to start from scratch")
        unknown = [name for name in self.freeze if name not in PARAM_GROUPS]
        if unknown:
            raise UserError(f"finetune.freeze names {', '.join(map(repr, unknown))}, which is no "
                            f"parameter group: choose from {', '.join(PARAM_GROUPS)}")
        if len(set(self.freeze)) != len(self.freeze):
            raise UserError(f"finetune.freeze={list(self.freeze)} repeats a group")
        check_at_least("finetune", self, "freeze_lower_blocks")
        check_at_least("finetune", self, "init_step", hint=" (or null for the latest checkpoint)")
        for group in PARAM_GROUPS:
            if not getattr(self.lr_multipliers, group) > 0:
                raise UserError(
                    f"finetune.lr_multipliers.{group}={getattr(self.lr_multipliers, group)} must "
                    f"be > 0: freeze a group with finetune.freeze=[{group}] instead")

    @property
    def frozen_groups(self) -> tuple[str, ...]:
        implied = ("embeddings", "blocks") if self.mode == "head_only" else ()
        return tuple(g for g in PARAM_GROUPS if g in self.freeze or g in implied)

    @property
    def changes_optimizer(self) -> bool:
        """False for plain training: the optimizer (and its checkpoint layout) stays as it was."""
        return bool(self.frozen_groups or self.freeze_lower_blocks) or any(
            getattr(self.lr_multipliers, group) != 1.0 for group in PARAM_GROUPS)


SCORE_MODES = ("min", "max")
SCORE_REDUCTIONS = ("best", "final")


@dataclass
class ScoreConfig:
    """The number `python -m jaxformer.train` returns to a sweeper that reads it (hydra/sweeper=
    optuna: jaxformer/analysis/score.py). Off (null metric) unless a search sets it."""

    metric: Optional[str] = None  # an eval metric (bpb, loss, accuracy...; eval/NAME, train/NAME)
    mode: str = "min"  # min | max: how the metric improves (the sweeper's direction must agree)
    reduce: str = "best"  # best: over the run's records of the metric | final: its last one

    def __post_init__(self) -> None:
        check_choice("score", self, "mode", SCORE_MODES)
        check_choice("score", self, "reduce", SCORE_REDUCTIONS)
        if self.metric is not None and not str(self.metric).strip():
            raise UserError("score.metric is empty: name an eval metric (bpb, loss, accuracy...) "
                            "or null for no score")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    data: DataConfig = field(default_factory=DataConfig)  # task=text: the corpus to prepare
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)  # task=text: its tokenizer
    score: ScoreConfig = field(default_factory=ScoreConfig)  # what a search (Optuna) optimises
    seed: int = 0
    name: str = "default"  # experiment name: the wandb group and the run dir's parent

    def __post_init__(self) -> None:
        vector_task = self.task.name in VECTOR_TASKS
        if self.model.kind == "mlp" and not vector_task:
            raise UserError(
                f"model.kind=mlp reads feature vectors, not task.name={self.task.name!r}: "
                f"use a vector task ({', '.join(VECTOR_TASKS)})"
            )
        if self.model.kind != "mlp" and vector_task:
            raise UserError(
                f"task.name={self.task.name!r} gives feature vectors, which model.kind="
                f"{self.model.kind} cannot read: use model=mlp"
            )


def register_configs() -> None:
    """Register the schemas so `conf/` YAML is validated against them."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, node in (
        ("model", ModelConfig), ("task", TaskConfig), ("optim", OptimConfig),
        ("trainer", TrainerConfig), ("logger", LoggerConfig), ("mesh", MeshConfig),
        ("sampling", SamplingConfig),
        ("finetune", FinetuneConfig), ("data", DataConfig), ("tokenizer", TokenizerConfig),
    ):
        cs.store(group=group, name=f"{group}_schema", node=node)


def to_config(cfg: DictConfig, schema: type, usage: str) -> Any:
    """Build (and so validate) the typed config a composed DictConfig stands for; a missing
    required key names the command's `usage`, other problems their first line."""
    try:
        obj = OmegaConf.to_object(cfg)
    except UserError:
        raise
    except MissingMandatoryValue as err:
        raise UserError(f"{err.full_key} is required: {usage}") from err
    except Exception as err:  # OmegaConf type errors
        raise UserError(str(err).splitlines()[0]) from err
    if not isinstance(obj, schema):
        raise UserError(f"the composed config is not a {schema.__name__}: {usage}")
    if isinstance(getattr(obj, "logger", None), LoggerConfig):
        obj.logger.wandb.resolved_mode()  # a bad $WANDB_MODE: one line before anything runs
    return obj


def to_train_config(cfg: DictConfig) -> TrainConfig:
    return to_config(cfg, TrainConfig, "python -m jaxformer.train [overrides] (conf/train.yaml)")


def check_step(step: int | None) -> None:
    """A checkpoint step setting (`step=`): a step, or null for the latest checkpoint."""
    if step is not None and step < 0:
        raise UserError(f"step={step} must be >= 0 (or null for the latest checkpoint)")


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
