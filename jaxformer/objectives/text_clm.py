"""text_clm: next-token prediction on packed rows of a prepared corpus (task=text, the decoder).

Batch: tokens (B, seq_len + 1) a window of the token stream (documents each followed by <eos>),
segment_ids and positions (B, seq_len + 1) from data/text.py: with document masking, no token
attends across a document boundary and positions restart at each document. The model reads
tokens[:, :-1] and predicts tokens[:, 1:], every target counted. Held-out batches also carry
loss_mask (B, seq_len) (ones: the zero rows that pad the last batch count nothing) and
target_bytes (B, seq_len), the UTF-8 bytes each target token decodes to, so evaluation reports
bits per byte = total nats / (ln 2 x bytes), comparable across tokenizers.
"""

from __future__ import annotations

import logging
import math

import jax.numpy as jnp
import numpy as np

from jaxformer.data.tokenizers import eos_id
from jaxformer.objectives.base import (
    Arrays, CorpusObjective, EvalSet, GenerativeObjective, token_loss,
)

log = logging.getLogger(__name__)


class TextCausalLM(CorpusObjective, GenerativeObjective):
    name = "text_clm"

    def max_positions(self, task) -> int:
        return task.seq_len

    def encode(self, task, rows) -> Arrays:
        tokens, segment_ids, positions = task.rows("train", rows)
        return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}

    def eval_set(self, task) -> EvalSet:
        tokens, segment_ids, positions = task.rows("validation", task.eval_rows())
        arrays = {"tokens": tokens, "segment_ids": segment_ids, "positions": positions,
                  "loss_mask": np.ones(tokens[:, 1:].shape, np.float32),
                  "target_bytes": task.token_bytes[tokens[:, 1:]]}
        return EvalSet([], arrays, references=task.reference_bpb(tokens[:, 1:]))

    def loss(self, model, batch, *, deterministic=True, rngs=None):
        tokens_bt = batch["tokens"]
        logits_btv = model(tokens_bt[:, :-1], segment_ids_bt=batch["segment_ids"][:, :-1],
                           positions_bt=batch["positions"][:, :-1], deterministic=deterministic,
                           rngs=rngs)
        targets_bt = tokens_bt[:, 1:]
        weights_bt = batch.get("loss_mask", jnp.ones(targets_bt.shape, jnp.float32))
        loss, metrics = token_loss(logits_btv, targets_bt, weights_bt)
        if "target_bytes" in batch:  # held-out batches: bits per byte
            metrics["bytes"] = batch["target_bytes"].astype(jnp.float32).sum()
        return loss, metrics

    def summarize(self, pooled: dict[str, float], data: EvalSet) -> dict[str, float]:
        """Held-out loss (nats per token), accuracy, perplexity, bits per byte and, on the same
        bytes, the unigram and zlib baselines' bits per byte."""
        metrics = super().summarize(pooled, data)
        if pooled.get("bytes"):
            metrics["bpb"] = pooled["loss"] * pooled["count"] / (math.log(2) * pooled["bytes"])
        return metrics

    # -- sampling from a trained run (the sample app) ---------------------------------------------
    def frame_prompt(self, tokenizer, text, max_len):
        """`<eos>` (the separator before every document in training) then the text's tokens;
        a prompt longer than the context is cut from the left, with a warning."""
        ids = [eos_id(tokenizer, "the run's tokenizer"), *tokenizer.encode(text).ids]
        room = max_len - 1  # at least one position left to generate into
        if len(ids) > room:
            log.warning("the prompt is %d tokens with its <eos>, the context %d: keeping its last "
                        "%d tokens", len(ids), max_len, room)
            ids = ids[-room:]
        return ids, ()

    def prompt_len(self, task) -> int:
        return 1

    def prompts(self, inputs, size):
        raise NotImplementedError("text runs have no held-out prompts")

    def answer_budget(self, data):
        raise NotImplementedError("text runs have no held-out answers")
