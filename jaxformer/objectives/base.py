"""What every objective is: one object holding how its batches are made, its loss and metrics,
its greedy answer for evaluation, and what it requires of a task and a model.

Every loss returns (scalar loss, metrics) with metrics {"loss", "accuracy", "count", "log_z_sq"}:
accuracy is next-token (clm, seq2seq), masked-token (mlm) or label (classification,
vector_classification) accuracy, count the tokens or examples it averages over, so evaluation can
pool batches exactly, and log_z_sq the mean of (log sum exp logits)^2 over them, which the train step
turns into PaLM's z-loss (optim.z_loss) or drops (unused, XLA prunes it).
Token arrays are int32, masks float32; B batch, T/S lengths, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.data.pipeline import RANDOMIZE_STREAM, padded_batches
from jaxformer.data.tasks import Problem, Task
from jaxformer.data.text import TextTask
from jaxformer.data.tokenizers import PAD_ID, vocab_size
from jaxformer.errors import UserError
from jaxformer.models import resolve_model_config
from jaxformer.models.decoding import completion_texts, generate
from jaxformer.models.flops import train_flops_per_example

Arrays = dict[str, np.ndarray]
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
LOG_Z_SQ = "log_z_sq"  # the metric the z-loss is made of


@dataclass
class EvalSet:
    """The held-out problems of a task, encoded for one objective."""

    problems: list[Problem]
    examples: Arrays  # the objective's batch format, for the teacher-forced eval loss
    # what decoding the answers starts from (generative objectives): prompts (N, P) right-padded
    # with <pad>, prompt_lens (N,) and, for an encoder-decoder, the source src / src_valid (N, S)
    decode_inputs: Arrays = field(default_factory=dict)
    # held-out numbers that do not depend on the model (text: baselines' bits per byte)
    references: dict[str, float] = field(default_factory=dict)


class Objective:
    """Base class of the objectives in jaxformer/objectives/ (on problems: clm, seq2seq, mlm,
    classification, vector_classification; on a text corpus: text_clm, text_mlm,
    span_corruption), picked for a model and task by `objective_for` (__init__.py)."""

    name: str
    randomizes = False  # batches get per-batch randomness on top of `encode` (masked LM)
    classifies = False  # the model predicts the task's classes (model.num_classes from the task)
    generative = False  # answers are decoded token by token (the sample and evaluate apps)
    text_answers = True  # answers are text a task checks (exact match); vectors have none
    reads_corpus = False  # trains on a prepared text corpus (task=text), not on problems

    def __repr__(self) -> str:
        return f"<objective {self.name}>"

    # -- requirements -----------------------------------------------------------------------------
    def check(self, task: Any, model_cfg: ModelConfig | None = None) -> None:
        """Refuse (UserError) a task, or a model, this objective cannot train on."""
        if task.tokenizer is None:
            raise UserError(f"the {self.name} objective reads tokens, but task {task.cfg.name!r} "
                            "gives feature vectors: use model=mlp")
        if self.reads_corpus != isinstance(task, TextTask):
            wants = "a prepared text corpus (task=text)" if self.reads_corpus else "problems"
            raise UserError(f"the {self.name} objective reads {wants}, not task "
                            f"{task.cfg.name!r}")
        if model_cfg is None:
            return
        needed = self.max_positions(task)
        if needed > model_cfg.max_len:
            raise UserError(
                f"task {task.cfg.name} needs {needed} positions for the {self.name} objective but "
                f"model.max_len={model_cfg.max_len}: set model.max_len>={needed} or shorten the task")

    def model_config(self, model_cfg: ModelConfig, task: Any) -> ModelConfig:
        """The model config with what the task decides filled in: the vocabulary (from its
        tokenizer), the classes (when this objective classifies), the features (vector tasks)."""
        vector_task = task.tokenizer is None
        return resolve_model_config(
            model_cfg, None if vector_task else vocab_size(task.tokenizer),
            task.num_classes if self.classifies else 0, task.input_dim if vector_task else None)

    def max_positions(self, task: Any) -> int:
        """Positions the model must embed: the widest token array of this objective's batches
        (what tokens_per_s counts per example)."""
        raise NotImplementedError

    def train_flops_per_example(self, model_cfg: ModelConfig, task: Any) -> float | None:
        """Model FLOPs of one training example (models/flops.py), what MFU counts; None when
        unknown (models without attention)."""
        return train_flops_per_example(model_cfg, self.max_positions(task))

    # -- batches (data/pipeline.py's Encoding) ----------------------------------------------------
    def encode(self, task: Any, problems: Any) -> Arrays:
        raise NotImplementedError

    def randomize(self, task: Any, arrays: Arrays, rng: np.random.Generator) -> Arrays:
        return arrays

    def eval_set(self, task: Any) -> EvalSet:
        """The held-out problems, their batches (randomness fixed by task.split_seed) and what
        decoding their answers starts from."""
        problems = task.eval_problems()
        return EvalSet(problems, self.eval_arrays(task, problems))

    def eval_arrays(self, task: Any, problems: Any) -> Arrays:
        """`encode` and, for a randomising objective, its held-out randomness."""
        arrays = self.encode(task, problems)
        if self.randomizes:
            arrays = self.randomize(task, arrays, self.eval_rng(task))
        return arrays

    @staticmethod
    def eval_rng(task: Any) -> np.random.Generator:
        """The held-out batches' randomness (masks): fixed by task.split_seed."""
        return np.random.default_rng([task.cfg.split_seed, 2, RANDOMIZE_STREAM])

    # -- loss -------------------------------------------------------------------------------------
    def loss(self, model: nnx.Module, batch: Batch, *, deterministic: bool = True,
             rngs: nnx.Rngs | None = None) -> tuple[jax.Array, Metrics]:
        """Forward `batch` (this objective's format) and score it."""
        raise NotImplementedError

    def summarize(self, pooled: dict[str, float], data: EvalSet) -> dict[str, float]:
        """The eval record from the held-out metrics pooled over every batch (loss and accuracy
        averaged over `count`, other metrics summed) and the held-out set's references."""
        return {"loss": pooled["loss"], "accuracy": pooled["accuracy"], **data.references}

    # -- answers ----------------------------------------------------------------------------------
    def greedy_answers(self, model: nnx.Module, data: EvalSet, task: Task,
                       batch_size: int) -> list[str]:
        """The model's greedy answer text for every problem of `data`."""
        raise NotImplementedError


class CorpusObjective(Objective):
    """An objective on a prepared text corpus (task=text): rows, no answer texts to check; the
    held-out record adds the perplexity."""

    text_answers = False
    reads_corpus = True

    def summarize(self, pooled: dict[str, float], data: EvalSet) -> dict[str, float]:
        return {**super().summarize(pooled, data),
                "perplexity": math.exp(min(pooled["loss"], 700.0))}

    def greedy_answers(self, model, data, task, batch_size) -> list[str]:
        return []


class GenerativeObjective(Objective):
    """An objective whose answers the model decodes token by token after a prompt (clm, seq2seq):
    held-out greedy answers, the sample app's framing of user text, the evaluate app's prompts."""

    generative = True

    def prompt_len(self, task: Task) -> int:
        """Tokens of the decoder-side prompt of every held-out problem (the longest)."""
        raise NotImplementedError

    def frame_prompt(self, tokenizer: Any, text: str, max_len: int) -> tuple[list[int], tuple]:
        """User text framed as training framed prompts: (decoder prompt ids, source arrays)."""
        raise NotImplementedError

    def prompts(self, inputs: Arrays, size: int) -> tuple[np.ndarray, np.ndarray, tuple]:
        """(prompts (B, P), prompt lengths (B,), source) of rows of `decode_inputs`, of which the
        first `size` are real (the rest batch padding)."""
        raise NotImplementedError

    def answer_budget(self, data: EvalSet) -> tuple[int, int | None]:
        """(max new tokens, max total tokens with the prompt) of a held-out answer."""
        raise NotImplementedError

    def greedy_answers(self, model: nnx.Module, data: EvalSet, task: Task,
                       batch_size: int) -> list[str]:
        max_new_tokens, max_total_len = self.answer_budget(data)
        texts: list[str] = []
        for batch, size in padded_batches(data.decode_inputs, batch_size):
            prompts, lens, source = self.prompts(batch, size)
            done = generate(model, prompts, lens, source=source, max_new_tokens=max_new_tokens,
                            max_total_len=max_total_len)
            texts += [first for first, *_ in completion_texts(task.tokenizer, done)[:size]]
        return texts


# -- losses ---------------------------------------------------------------------------------------
def first_argmax(logits_btv: jax.Array) -> jax.Array:
    """`jnp.argmax(logits, -1)` (ties go to the first index) as a max and a min over the vocabulary:
    on XLA:CPU the (value, index) reduction jnp.argmax lowers to took 74 ms of a bench-small train
    step, these two plain reductions ~35 ms (docs/performance.md)."""
    is_max_btv = logits_btv == logits_btv.max(axis=-1, keepdims=True)
    index_btv = jax.lax.broadcasted_iota(jnp.int32, logits_btv.shape, logits_btv.ndim - 1)
    return jnp.where(is_max_btv, index_btv, logits_btv.shape[-1]).min(axis=-1)


def token_loss(
    logits_btv: jax.Array, targets_bt: jax.Array, weights_bt: jax.Array
) -> tuple[jax.Array, Metrics]:
    """Cross-entropy of `targets_bt` under `logits_btv`, averaged over the positions `weights_bt` marks."""
    weights_bt = weights_bt.astype(jnp.float32)
    token_nll_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, targets_bt)
    count = jnp.maximum(weights_bt.sum(), 1.0)
    loss = (token_nll_bt * weights_bt).sum() / count
    correct_bt = (first_argmax(logits_btv) == targets_bt) * weights_bt
    log_z_sq = (log_z(logits_btv) ** 2 * weights_bt).sum() / count
    return loss, {"loss": loss, "accuracy": correct_bt.sum() / count, "count": weights_bt.sum(),
                  LOG_Z_SQ: log_z_sq}


def next_token_loss(
    logits_btv: jax.Array, tokens_bt: jax.Array, loss_mask_bt: jax.Array
) -> tuple[jax.Array, Metrics]:
    """Next-token cross-entropy: logits at t predict tokens[t + 1], weighted by loss_mask[t + 1].

    `logits_btv` are the model's outputs on `tokens_bt[:, :-1]`.
    """
    return token_loss(logits_btv, tokens_bt[:, 1:], loss_mask_bt[:, 1:])


def classification_loss(logits_bc: jax.Array, labels_b: jax.Array) -> tuple[jax.Array, Metrics]:
    loss = optax.softmax_cross_entropy_with_integer_labels(logits_bc, labels_b).mean()
    accuracy = (jnp.argmax(logits_bc, axis=-1) == labels_b).mean()
    return loss, {"loss": loss, "accuracy": accuracy, "count": jnp.asarray(labels_b.shape[0], jnp.float32),
                  LOG_Z_SQ: (log_z(logits_bc) ** 2).mean()}


def log_z(logits: jax.Array) -> jax.Array:
    """log Z = log sum exp over the last (class) axis, in float32."""
    return jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)


# -- encoding helpers -----------------------------------------------------------------------------
def pad_rows(rows: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad id lists with <pad>: tokens (N, length) int32 and valid (N, length) float32."""
    tokens = np.full((len(rows), length), PAD_ID, np.int32)
    valid = np.zeros((len(rows), length), np.float32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
        valid[i, : len(row)] = 1.0
    return tokens, valid


def text_ids(task: Task, problems: list[Problem]) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt and answer ids of each problem (no special tokens)."""
    prompts = task.tokenizer.encode_batch([task.prompt(p) for p in problems])
    answers = task.tokenizer.encode_batch([task.answer(p) for p in problems])
    return [e.ids for e in prompts], [e.ids for e in answers]


def from_start(starts: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """valid, zeroed before each row's start position: the answer + <eos> loss mask."""
    return valid * (np.arange(valid.shape[1]) >= starts[:, None])
