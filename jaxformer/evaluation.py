"""Evaluation on held-out problems: teacher-forced loss, and greedy exact match for every objective.

Each family answers a task's prompt its own way, and the task's checker scores the answer text:
the decoder continues the prompt, the encoder-decoder decodes a target from the prompt as source,
the encoder classifies (the label is the answer text) or, for generative tasks under masked-LM,
fills in the answer with every answer position masked at once (it is told the answer's length).
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.data.pipeline import EvalSet
from jaxformer.data.tokenizers import EOS_ID, MASK_ID
from jaxformer.parallel import to_host
from jaxformer.sampling import Completions, generate, generate_seq2seq


def _padded_batches(arrays: dict[str, np.ndarray], batch_size: int):
    """Fixed-size batches (the last one zero-padded) so one compiled step serves them all."""
    n = len(next(iter(arrays.values())))
    for start in range(0, n, batch_size):
        chunk = {k: v[start : start + batch_size] for k, v in arrays.items()}
        size = len(next(iter(chunk.values())))
        if size < batch_size:
            chunk = {k: np.concatenate([v, np.zeros((batch_size - size, *v.shape[1:]), v.dtype)])
                     for k, v in chunk.items()}
        yield chunk, size


def until_eos(ids: list[int]) -> list[int]:
    """Token ids up to (not including) the first <eos>."""
    return ids[: ids.index(EOS_ID)] if EOS_ID in ids else ids


def completion_texts(tokenizer, done: Completions) -> list[list[str]]:
    """The text of every completion (B prompts x N): its tokens up to <eos>, decoded."""
    tokens, lengths = to_host((done.tokens, done.lengths))
    return [[tokenizer.decode(until_eos(row[:n].tolist())) for row, n in zip(rows, row_lengths)]
            for rows, row_lengths in zip(tokens, lengths)]


def ended_at_eos(done: Completions) -> np.ndarray:
    """(B, N) whether each completion stopped at <eos> (else it ran out of new tokens)."""
    tokens, lengths = to_host((done.tokens, done.lengths))
    last = np.take_along_axis(tokens, np.maximum(lengths - 1, 0)[..., None], axis=-1)[..., 0]
    return (lengths > 0) & (last == EOS_ID)


def eval_loss(eval_step: Callable, params: nnx.State, data: EvalSet, batch_size: int) -> dict:
    """Teacher-forced loss and accuracy, pooled exactly over tokens (or examples)."""
    totals = defaultdict(float)
    for batch, _ in _padded_batches(data.examples, batch_size):
        metrics = to_host(eval_step(params, batch))
        count = float(metrics["count"])  # padding rows carry no loss weight (or label count)
        totals["loss"] += float(metrics["loss"]) * count
        totals["accuracy"] += float(metrics["accuracy"]) * count
        totals["count"] += count
    return {"loss": totals["loss"] / totals["count"], "accuracy": totals["accuracy"] / totals["count"]}


@partial(jax.jit, static_argnames=("graphdef",))
def _class_predictions(graphdef, state, tokens_bt, valid_bt):
    model = nnx.merge(graphdef, state)
    return jnp.argmax(model.classify(model.hidden(tokens_bt, valid_bt), valid_bt), axis=-1)


@partial(jax.jit, static_argnames=("graphdef",))
def _mlm_predictions(graphdef, state, inputs_bt, valid_bt):
    model = nnx.merge(graphdef, state)
    return jnp.argmax(model.mlm_logits(model(inputs_bt, valid_bt)), axis=-1)


def _answer_spans(task, data: EvalSet) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) token positions of each problem's answer in `<bos> prompt answer <eos>`."""
    prompts = task.tokenizer.encode_batch([task.prompt(p) for p in data.problems])
    answers = task.tokenizer.encode_batch([task.answer(p) for p in data.problems])
    starts = np.asarray([1 + len(p.ids) for p in prompts])
    return starts, starts + np.asarray([len(a.ids) for a in answers])


def greedy_completions(model: nnx.Module, data: EvalSet, task, objective: str,
                       batch_size: int) -> list[str]:
    """The model's greedy answer text for every problem of `data`."""
    graphdef, state = nnx.split(model)
    texts: list[str] = []
    if objective == "clm":  # each row fills the training sequence length, as teacher forcing sees
        arrays = {"prompts": data.prompts, "prompt_lens": data.prompt_lens}
        total_len = data.examples["tokens"].shape[1]
        max_new_tokens = total_len - int(data.prompt_lens.min())
    elif objective == "seq2seq":
        arrays = {"src": data.src, "src_valid": data.src_valid}
        max_new_tokens = data.examples["tgt"].shape[1] - 1  # after <bos>
    elif objective == "classification":
        arrays = {"tokens": data.examples["tokens"], "valid": data.examples["valid"]}
    else:  # mlm: mask the whole answer span of the uncorrupted sequence
        starts, ends = _answer_spans(task, data)
        tokens = data.examples["targets"]
        positions = np.arange(tokens.shape[1])
        in_answer = (positions >= starts[:, None]) & (positions < ends[:, None])
        arrays = {"inputs": np.where(in_answer, MASK_ID, tokens).astype(np.int32),
                  "valid": data.examples["valid"], "in_answer": in_answer}
    for batch, size in _padded_batches(arrays, batch_size):
        if objective in ("clm", "seq2seq"):
            if objective == "clm":
                lens = np.where(np.arange(batch_size) < size, batch["prompt_lens"],
                                data.prompt_lens.max())
                done = generate(model, batch["prompts"], lens, max_new_tokens=max_new_tokens,
                                max_total_len=total_len)
            else:
                done = generate_seq2seq(model, batch["src"], batch["src_valid"],
                                        max_new_tokens=max_new_tokens)
            texts += [first for first, *_ in completion_texts(task.tokenizer, done)[:size]]
        elif objective == "classification":
            labels = to_host(_class_predictions(graphdef, state, batch["tokens"], batch["valid"]))
            texts += [str(label) for label in labels[:size]]
        else:
            ids = to_host(_mlm_predictions(graphdef, state, batch["inputs"], batch["valid"]))
            texts += [task.tokenizer.decode(row[mask].tolist())
                      for row, mask in zip(ids[:size], batch["in_answer"][:size])]
    return texts


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
