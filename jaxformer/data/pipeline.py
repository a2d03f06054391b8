"""grain pipelines: fixed-shape training batches with a checkpointable position, and eval arrays.

One task, four batch formats (numpy; token ids int32, masks float32; B batch, L/S/T lengths):
  clm             tokens (B, seq_len) `<bos> prompt answer <eos> <pad>...`; loss_mask (B, seq_len)
                  1 on answer + <eos>. The model sees tokens[:, :-1], predicts tokens[:, 1:]
                  weighted by loss_mask[:, 1:].
  seq2seq         src (B, src_len) `prompt <eos> <pad>...`, src_valid (B, src_len) 1 on real tokens;
                  tgt (B, tgt_len) `<bos> answer <eos> <pad>...`, loss_mask (B, tgt_len) 1 on
                  answer + <eos>; the decoder sees tgt[:, :-1], predicts tgt[:, 1:] as in clm.
  mlm             inputs (B, seq_len) the clm text corrupted, targets (B, seq_len) the clean ids,
                  loss_mask (B, seq_len) 1 at selected positions, valid (B, seq_len) 1 on non-pad.
  classification  tokens (B, cls_len) `<bos> prompt <eos> <pad>...`, valid (B, cls_len), label (B,).
A vector task (data/vectors.py) has one format:
  vector_classification  features (B, input_dim) float32, label (B,) int32.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import grain
import numpy as np

from jaxformer.data.tasks import Problem, Task
from jaxformer.data.vectors import TeacherTask
from jaxformer.data.tokenizers import BOS_ID, EOS_ID, MASK_ID, NUM_SPECIAL, PAD_ID

OBJECTIVES = ("clm", "seq2seq", "mlm", "classification", "vector_classification")
# masked-LM corruption of the selected tokens (BERT): 80% <mask>, 10% a random symbol, 10% kept
MASK_TOKEN_SHARE, RANDOM_TOKEN_SHARE = 0.8, 0.1
# third entry of the mlm masking seeds, so they never coincide with the problem-sampling seeds
MLM_STREAM = 7


# -- encoding -------------------------------------------------------------------------------------
def _pad_rows(rows: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad id lists with <pad>: tokens (N, length) int32 and valid (N, length) float32."""
    tokens = np.full((len(rows), length), PAD_ID, np.int32)
    valid = np.zeros((len(rows), length), np.float32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
        valid[i, : len(row)] = 1.0
    return tokens, valid


def _text_ids(task: Task, problems: list[Problem]) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt and answer ids of each problem (no special tokens)."""
    prompts = task.tokenizer.encode_batch([task.prompt(p) for p in problems])
    answers = task.tokenizer.encode_batch([task.answer(p) for p in problems])
    return [e.ids for e in prompts], [e.ids for e in answers]


def _after(starts: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """valid, zeroed before each row's start position: the answer + <eos> loss mask."""
    return valid * (np.arange(valid.shape[1]) >= starts[:, None])


def _encode_clm(task: Task, problems: list[Problem]) -> dict[str, np.ndarray]:
    prompts, answers = _text_ids(task, problems)
    tokens, valid = _pad_rows([[BOS_ID, *p, *a, EOS_ID] for p, a in zip(prompts, answers)],
                              task.seq_len)
    prompt_lens = np.array([1 + len(p) for p in prompts], np.int32)
    return {"tokens": tokens, "loss_mask": _after(prompt_lens, valid)}


def _encode_seq2seq(task: Task, problems: list[Problem]) -> dict[str, np.ndarray]:
    prompts, answers = _text_ids(task, problems)
    src, src_valid = _pad_rows([[*p, EOS_ID] for p in prompts], task.src_len)
    tgt, tgt_valid = _pad_rows([[BOS_ID, *a, EOS_ID] for a in answers], task.tgt_len)
    loss_mask = _after(np.ones(len(problems), np.int32), tgt_valid)  # every target but <bos>
    return {"src": src, "src_valid": src_valid, "tgt": tgt, "loss_mask": loss_mask}


def _encode_mlm_text(task: Task, problems: list[Problem]) -> dict[str, np.ndarray]:
    """The uncorrupted half of an mlm batch; `_mask_tokens` adds inputs and loss_mask."""
    clm = _encode_clm(task, problems)
    return {"targets": clm["tokens"], "valid": (clm["tokens"] != PAD_ID).astype(np.float32)}


def _encode_classification(task: Task, problems: list[Problem]) -> dict[str, np.ndarray]:
    prompts, _ = _text_ids(task, problems)
    tokens, valid = _pad_rows([[BOS_ID, *p, EOS_ID] for p in prompts], task.cls_len)
    labels = np.array([task.label(p) for p in problems], np.int32)
    return {"tokens": tokens, "valid": valid, "label": labels}


def _encode_vectors(task: TeacherTask, examples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return examples  # a vector task draws its examples as arrays already


# deterministic per problem, so a fixed training set is encoded once; mlm masking comes after
_ENCODERS: dict[str, Callable[[Task, list[Problem]], dict[str, np.ndarray]]] = {
    "clm": _encode_clm, "seq2seq": _encode_seq2seq, "mlm": _encode_mlm_text,
    "classification": _encode_classification, "vector_classification": _encode_vectors,
}


def _mask_tokens(task: Task, text: dict[str, np.ndarray],
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    """BERT-style corruption of `_encode_mlm_text` arrays: each real symbol (never <pad>, <bos>,
    <eos>) is selected with probability task.cfg.mask_prob, at least one per row."""
    targets = text["targets"]
    candidates = targets >= NUM_SPECIAL
    selected = candidates & (rng.random(targets.shape) < task.cfg.mask_prob)
    fallback = np.argmax(np.where(candidates, rng.random(targets.shape), -1.0), axis=1)  # uniform pick
    empty_rows = np.flatnonzero(~selected.any(axis=1))
    selected[empty_rows, fallback[empty_rows]] = True
    action = rng.random(targets.shape)
    random_ids = rng.integers(NUM_SPECIAL, NUM_SPECIAL + len(task.alphabet), size=targets.shape)
    inputs = np.where(selected & (action < MASK_TOKEN_SHARE), MASK_ID, targets)
    inputs = np.where(selected & (action >= MASK_TOKEN_SHARE)
                      & (action < MASK_TOKEN_SHARE + RANDOM_TOKEN_SHARE), random_ids, inputs)
    return {"inputs": inputs.astype(np.int32), "targets": targets,
            "loss_mask": selected.astype(np.float32), "valid": text["valid"]}


def _eval_mask_rng(task: Task) -> np.random.Generator:
    return np.random.default_rng([task.cfg.split_seed, 2, MLM_STREAM])


def check_objective(task: Task, objective: str) -> None:
    """One-line ValueError for an unknown objective or one the task cannot serve."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if objective == "classification" and not task.is_classification:
        raise ValueError(
            f"objective 'classification' needs a classification task such as is_sorted, "
            f"not {task.cfg.name!r}"
        )
    if (objective == "vector_classification") != (task.tokenizer is None):
        raise ValueError(f"objective {objective!r} cannot read task {task.cfg.name!r}: vector tasks "
                         "go with vector_classification, token tasks with the other objectives")


def encode_problems(task: Task, objective: str, problems: list[Problem],
                    mask_rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """The problems as one batch in `objective`'s format. mlm masking draws from `mask_rng`
    (default: the eval masking, fixed by task.split_seed)."""
    check_objective(task, objective)
    arrays = _ENCODERS[objective](task, problems)
    if objective == "mlm":
        arrays = _mask_tokens(task, arrays, _eval_mask_rng(task) if mask_rng is None else mask_rng)
    return arrays


# -- training -------------------------------------------------------------------------------------
def train_dataset(task: Task, objective: str, batch_size: int, seed: int) -> grain.MapDataset:
    """An endless, seeded MapDataset of batches (random access: batch i is always the same).

    With task.train_size set, epochs over that many unique problems, reshuffled every epoch;
    otherwise every batch draws fresh non-held-out problems from a generator seeded by (seed, i).
    mlm masks are drawn per batch index from (seed, i, MLM_STREAM): they differ between epochs.
    """
    check_objective(task, objective)
    encode = _ENCODERS[objective]
    if task.cfg.train_size is not None:
        arrays = encode(task, task.train_problems(task.cfg.train_size, seed))
        dataset = (
            grain.MapDataset.range(task.cfg.train_size).shuffle(seed=seed).repeat()
            .batch(batch_size, drop_remainder=True, batch_fn=np.asarray)
            .map(lambda rows: {key: value[rows] for key, value in arrays.items()})
        )
    else:
        def fresh_batch(index: int) -> dict[str, np.ndarray]:
            return encode(task, task.sample_train(np.random.default_rng([seed, index]), batch_size))
        dataset = grain.MapDataset.range(sys.maxsize).map(fresh_batch)
    if objective == "mlm":
        def masked_batch(index: int, text: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return _mask_tokens(task, text, np.random.default_rng([seed, index, MLM_STREAM]))
        dataset = dataset.map_with_index(masked_batch)
    return dataset


def train_iterator(task: Task, objective: str, batch_size: int, seed: int,
                   rows: slice = slice(None)) -> grain.DatasetIterator:
    """Iterator whose `get_state()` / `set_state()` is the data position saved with checkpoints.

    `rows` picks this process's share of every global batch (multi-host: each process feeds its
    own devices), so the global batch is the same whatever the process count."""
    read_options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)
    dataset = train_dataset(task, objective, batch_size, seed)
    if rows != slice(None):
        dataset = dataset.map(lambda batch: {key: value[rows] for key, value in batch.items()})
    return iter(dataset.to_iter_dataset(read_options))


# -- evaluation -----------------------------------------------------------------------------------
@dataclass
class EvalSet:
    problems: list[Problem]
    examples: dict[str, np.ndarray]  # the objective's batch format, for the teacher-forced eval loss
    prompts: np.ndarray | None = None  # clm: (N, prompt_len) `<bos> prompt`, right-padded with <pad>
    prompt_lens: np.ndarray | None = None  # clm: (N,) int32, <bos> included
    src: np.ndarray | None = None  # seq2seq: (N, src_len) encoder input to decode answers from
    src_valid: np.ndarray | None = None  # seq2seq: (N, src_len)


def eval_set(task: Task, objective: str) -> EvalSet:
    """The held-out problems encoded for `objective` (mlm masking fixed by task.split_seed)."""
    check_objective(task, objective)
    problems = task.eval_problems()
    examples = encode_problems(task, objective, problems)
    if objective == "clm":
        # the prompt ends where the answer's loss mask starts
        prompt_lens = np.argmax(examples["loss_mask"] > 0, axis=1).astype(np.int32)
        prompt_bp = examples["tokens"][:, : task.prompt_len]
        prompts = np.where(np.arange(task.prompt_len) < prompt_lens[:, None], prompt_bp, PAD_ID)
        return EvalSet(problems, examples, prompts=prompts.astype(np.int32), prompt_lens=prompt_lens)
    if objective == "seq2seq":
        return EvalSet(problems, examples, src=examples["src"], src_valid=examples["src_valid"])
    if objective == "vector_classification":
        return EvalSet([], examples)  # no problem texts to complete
    return EvalSet(problems, examples)
