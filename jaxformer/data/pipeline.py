"""grain pipelines: fixed-shape training batches with a checkpointable position, and eval arrays."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import grain
import numpy as np

from jaxformer.data.tasks import AdditionTask, Problem
from jaxformer.data.tokenizers import BOS_ID, EOS_ID, PAD_ID


def encode_problems(task: AdditionTask, problems: list[Problem]) -> dict[str, np.ndarray]:
    """tokens (N, seq_len): <bos> prompt answer <eos> <pad>...; loss_mask marks answer and <eos>;
    prompt_lens (N,): prompt tokens including <bos>."""
    prompts = task.tokenizer.encode_batch([task.prompt(p) for p in problems])
    answers = task.tokenizer.encode_batch([task.answer(p) for p in problems])
    tokens = np.full((len(problems), task.seq_len), PAD_ID, np.int32)
    loss_mask = np.zeros((len(problems), task.seq_len), np.float32)
    prompt_lens = np.zeros(len(problems), np.int32)
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        ids = [BOS_ID, *prompt.ids, *answer.ids, EOS_ID]
        tokens[i, : len(ids)] = ids
        prompt_lens[i] = 1 + len(prompt.ids)
        loss_mask[i, prompt_lens[i] : len(ids)] = 1.0
    return {"tokens": tokens, "loss_mask": loss_mask, "prompt_lens": prompt_lens}


def train_dataset(task: AdditionTask, batch_size: int, seed: int) -> grain.MapDataset:
    """An endless, seeded MapDataset of batches (random access: batch i is always the same).

    With task.train_size set, epochs over that many unique problems, reshuffled every epoch;
    otherwise every batch draws fresh non-held-out problems from a generator seeded by (seed, i).
    """
    if task.cfg.train_size is not None:
        arrays = encode_problems(task, task.train_problems(task.cfg.train_size, seed))
        del arrays["prompt_lens"]
        return (
            grain.MapDataset.range(task.cfg.train_size).shuffle(seed=seed).repeat()
            .batch(batch_size, drop_remainder=True, batch_fn=np.asarray)
            .map(lambda rows: {key: value[rows] for key, value in arrays.items()})
        )

    def make_batch(index: int) -> dict[str, np.ndarray]:
        problems = task.sample_train(np.random.default_rng([seed, index]), batch_size)
        arrays = encode_problems(task, problems)
        del arrays["prompt_lens"]
        return arrays

    return grain.MapDataset.range(sys.maxsize).map(make_batch)


def train_iterator(task: AdditionTask, batch_size: int, seed: int) -> grain.DatasetIterator:
    """Iterator whose `get_state()` / `set_state()` is the data position saved with checkpoints."""
    read_options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)
    return iter(train_dataset(task, batch_size, seed).to_iter_dataset(read_options))


@dataclass
class EvalSet:
    problems: list[Problem]
    prompts: np.ndarray  # (N, prompt_len) int32, right-padded with <pad>
    prompt_lens: np.ndarray  # (N,) int32, <bos> included
    examples: dict[str, np.ndarray]  # teacher-forced tokens/loss_mask for the eval loss


def eval_set(task: AdditionTask) -> EvalSet:
    problems = task.eval_problems()
    arrays = encode_problems(task, problems)
    prompt_lens = arrays.pop("prompt_lens")
    positions = np.arange(task.prompt_len)
    prompts = np.where(positions < prompt_lens[:, None], arrays["tokens"][:, : task.prompt_len], PAD_ID)
    return EvalSet(problems, prompts.astype(np.int32), prompt_lens, arrays)
