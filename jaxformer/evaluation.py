"""Evaluation on held-out problems: teacher-forced loss and greedy exact-match accuracy."""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import jax
import numpy as np
from flax import nnx

from jaxformer.data.pipeline import EvalSet
from jaxformer.data.tasks import AdditionTask
from jaxformer.data.tokenizers import EOS_ID
from jaxformer.sampling import generate


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


def completion_ids(row: np.ndarray, prompt_len: int) -> list[int]:
    """Generated ids after the prompt, up to (not including) the first <eos>."""
    out = row[prompt_len:].tolist()
    return out[: out.index(EOS_ID)] if EOS_ID in out else out


def eval_loss(eval_step: Callable, params: nnx.State, data: EvalSet, batch_size: int) -> dict:
    total_nll = total_tokens = total_correct = 0.0
    for batch, _ in _padded_batches(data.examples, batch_size):
        metrics = jax.device_get(eval_step(params, batch))
        total_nll += float(metrics["loss"]) * float(metrics["tokens"])
        total_correct += float(metrics["token_accuracy"]) * float(metrics["tokens"])
        total_tokens += float(metrics["tokens"])
    return {"loss": total_nll / total_tokens, "token_accuracy": total_correct / total_tokens}


def greedy_completions(model: nnx.Module, data: EvalSet, task: AdditionTask, batch_size: int):
    """Greedy completion text for every problem of `data`."""
    texts: list[str] = []
    arrays = {"prompts": data.prompts, "prompt_lens": data.prompt_lens}
    for batch, size in _padded_batches(arrays, batch_size):
        lens = np.where(np.arange(batch_size) < size, batch["prompt_lens"], data.prompt_lens.max())
        tokens_bt = np.asarray(generate(model, batch["prompts"], lens, total_len=task.seq_len))
        for row, prompt_len in zip(tokens_bt[:size], lens[:size]):
            texts.append(task.tokenizer.decode(completion_ids(row, int(prompt_len))))
    return texts


def exact_match(task: AdditionTask, data: EvalSet, completions: list[str]) -> dict[str, float]:
    """Overall accuracy and accuracy per difficulty (digits of the longer operand)."""
    by_difficulty: dict[int, list[bool]] = defaultdict(list)
    for problem, text in zip(data.problems, completions):
        by_difficulty[problem.difficulty].append(task.check(problem, text))
    everything = [ok for oks in by_difficulty.values() for ok in oks]
    metrics = {"exact_match": float(np.mean(everything))}
    for digits, oks in sorted(by_difficulty.items()):
        metrics[f"exact_match_{digits}digit"] = float(np.mean(oks))
    return metrics
