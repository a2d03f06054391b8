"""mlm: BERT's masked language modelling, the encoder's objective on generative tasks.

Batch: inputs (B, seq_len) the clm text `<bos> prompt answer <eos>` corrupted, targets (B, seq_len)
the clean ids, loss_mask (B, seq_len) 1 at the selected positions, valid (B, seq_len) 1 on
non-padding. Each real symbol (never <pad>, <bos>, <eos>) is selected with probability
task.mask_prob (at least one per row) and replaced by <mask> (80%), a random symbol (10%) or kept
(10%); masks are drawn per batch, so they differ between epochs. The greedy answer fills in the
whole answer span, masked at once (the model is told the answer's length).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.data.pipeline import padded_batches
from jaxformer.data.tokenizers import MASK_ID, NUM_SPECIAL, PAD_ID
from jaxformer.objectives.base import Arrays, Objective, token_loss
from jaxformer.objectives.clm import CausalLM
from jaxformer.parallel import to_host

# corruption of the selected tokens (BERT): 80% <mask>, 10% a random symbol, 10% kept
MASK_TOKEN_SHARE, RANDOM_TOKEN_SHARE = 0.8, 0.1


class MaskedLM(Objective):
    name = "mlm"
    randomizes = True

    def max_positions(self, task) -> int:
        return task.seq_len

    def encode(self, task, problems) -> Arrays:
        """The uncorrupted half: `randomize` adds inputs and loss_mask."""
        tokens = CausalLM().encode(task, problems)["tokens"]
        return {"targets": tokens, "valid": (tokens != PAD_ID).astype(np.float32)}

    def randomize(self, task, arrays, rng) -> Arrays:
        targets = arrays["targets"]
        inputs, selected = bert_corruption(
            targets, targets >= NUM_SPECIAL, task.cfg.mask_prob, rng,
            lambda shape: rng.integers(NUM_SPECIAL, NUM_SPECIAL + len(task.alphabet), size=shape))
        return {"inputs": inputs, "targets": targets, "loss_mask": selected.astype(np.float32),
                "valid": arrays["valid"]}

    def loss(self, model, batch, *, deterministic=True, rngs=None):
        hidden_btd = model(batch["inputs"], batch["valid"], deterministic=deterministic, rngs=rngs)
        return token_loss(model.mlm_logits(hidden_btd), batch["targets"], batch["loss_mask"])

    def greedy_answers(self, model, data, task, batch_size) -> list[str]:
        starts, ends = answer_spans(task, data.problems)
        tokens = data.examples["targets"]
        positions = np.arange(tokens.shape[1])
        in_answer = (positions >= starts[:, None]) & (positions < ends[:, None])
        arrays = {"inputs": np.where(in_answer, MASK_ID, tokens).astype(np.int32),
                  "valid": data.examples["valid"], "in_answer": in_answer}
        graphdef, state = nnx.split(model)
        texts = []
        for batch, size in padded_batches(arrays, batch_size):
            ids = to_host(_predictions(graphdef, state, batch["inputs"], batch["valid"]))
            texts += [task.tokenizer.decode(row[mask].tolist())
                      for row, mask in zip(ids[:size], batch["in_answer"][:size])]
        return texts


def bert_corruption(targets: np.ndarray, candidates: np.ndarray, mask_prob: float,
                    rng: np.random.Generator, random_ids: Callable[[tuple], np.ndarray]):
    """(inputs int32, selected bool) of BERT's corruption: each candidate token is selected with
    probability mask_prob (at least one per row), and replaced by <mask> (80%), a token from
    `random_ids(shape)` (10%) or kept (10%)."""
    selected = candidates & (rng.random(targets.shape) < mask_prob)
    fallback = np.argmax(np.where(candidates, rng.random(targets.shape), -1.0), axis=1)
    empty_rows = np.flatnonzero(~selected.any(axis=1))
    selected[empty_rows, fallback[empty_rows]] = True  # a uniform pick
    action = rng.random(targets.shape)
    replacements = random_ids(targets.shape)
    inputs = np.where(selected & (action < MASK_TOKEN_SHARE), MASK_ID, targets)
    inputs = np.where(selected & (action >= MASK_TOKEN_SHARE)
                      & (action < MASK_TOKEN_SHARE + RANDOM_TOKEN_SHARE), replacements, inputs)
    return inputs.astype(np.int32), selected


def answer_spans(task, problems) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) token positions of each problem's answer in `<bos> prompt answer <eos>`."""
    prompts = task.tokenizer.encode_batch([task.prompt(p) for p in problems])
    answers = task.tokenizer.encode_batch([task.answer(p) for p in problems])
    starts = np.asarray([1 + len(p.ids) for p in prompts])
    return starts, starts + np.asarray([len(a.ids) for a in answers])


@partial(jax.jit, static_argnames=("graphdef",))
def _predictions(graphdef, state, inputs_bt, valid_bt):
    model = nnx.merge(graphdef, state)
    return jnp.argmax(model.mlm_logits(model(inputs_bt, valid_bt)), axis=-1)
