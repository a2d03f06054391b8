"""span_corruption: T5's objective (Raffel et al. 2020, section 3.1.4) on packed rows of a
prepared corpus (task=text, the encoder-decoder).

Of each row's seq_len tokens, round(seq_len x task.noise_density) are noise, in
round(noise / task.mean_span_length) spans; span and gap lengths are random partitions (every span
and gap at least one token, the row starting with a gap). The encoder reads the row with every
noise span replaced by one sentinel (`<extra_id_0>`, `<extra_id_1>`, ... in order) and `<eos>`;
the decoder predicts each sentinel followed by the tokens it hid, then `<eos>`, after `<bos>`.
Both lengths are fixed by seq_len, so batches need no padding. Spans are drawn per batch (per row
from the batch's generator), the held-out ones from task.split_seed.

Batch: src (B, S), src_valid (B, S) ones, tgt (B, T) `<bos> targets <eos>`, loss_mask (B, T) 1 on
all but `<bos>` (as seq2seq). Rows are corrupted whole, documents and their `<eos>` included (a
row may hold several documents, each ending in `<eos>`, as T5's concatenated inputs do).
"""

from __future__ import annotations

import numpy as np

from jaxformer.data.tokenizers import BOS_ID, EOS_ID
from jaxformer.errors import UserError
from jaxformer.objectives.base import Arrays, CorpusObjective, EvalSet, next_token_loss

SENTINEL = "<extra_id_{}>"


def span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a row of `length` tokens, as T5 counts them."""
    noise = min(max(round(length * noise_density), 1), length - 1)
    return noise, max(min(round(noise / mean_span_length), noise, length - noise), 1)


def random_partition(items: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`parts` positive lengths summing to `items`, uniformly over such partitions."""
    cuts = np.sort(rng.choice(items - 1, parts - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [items]]))


def noise_mask(length: int, noise: int, spans: int, rng: np.random.Generator) -> np.ndarray:
    """(length,) bool: `spans` noise spans of `noise` tokens in all, gaps between, a gap first."""
    noise_lengths = random_partition(noise, spans, rng)
    gap_lengths = random_partition(length - noise, spans, rng)
    pieces = np.stack([gap_lengths, noise_lengths], axis=1).reshape(-1)  # gap, span, gap, span...
    return np.repeat(np.tile([False, True], spans), pieces)


class SpanCorruption(CorpusObjective):
    name = "span_corruption"
    randomizes = True

    def check(self, task, model_cfg=None) -> None:
        super().check(task, model_cfg)
        _, spans = self._counts(task)
        self.sentinel_ids(task.tokenizer, spans)  # refuses a tokenizer without enough sentinels

    @staticmethod
    def _counts(task) -> tuple[int, int]:
        return span_counts(task.seq_len, task.cfg.noise_density, task.cfg.mean_span_length)

    @staticmethod
    def sentinel_ids(tokenizer, spans: int) -> np.ndarray:
        ids = [tokenizer.token_to_id(SENTINEL.format(i)) for i in range(spans)]
        if None in ids:
            raise UserError(f"span corruption needs {spans} sentinel tokens "
                            f"({SENTINEL.format(0)} ...) in the run's tokenizer, which has "
                            f"{ids.index(None)}: prepare the corpus with tokenizer.sentinels>="
                            f"{spans} (or raise task.mean_span_length)")
        return np.asarray(ids, np.int32)

    def lengths(self, task) -> tuple[int, int]:
        """(source, target) lengths: every row's."""
        noise, spans = self._counts(task)
        return task.seq_len - noise + spans + 1, 1 + noise + spans + 1

    def max_positions(self, task) -> int:
        return max(self.lengths(task))

    def encode(self, task, rows) -> Arrays:
        return {"tokens": task.rows("train", rows)[0][:, :-1]}

    def randomize(self, task, arrays, rng) -> Arrays:
        noise, spans = self._counts(task)
        sentinels = self.sentinel_ids(task.tokenizer, spans)
        src_rows, tgt_rows = [], []
        for tokens in arrays["tokens"]:
            is_noise = noise_mask(len(tokens), noise, spans, rng)
            starts = is_noise & ~np.concatenate([[False], is_noise[:-1]])  # a span's first token
            span_index = np.cumsum(starts) - 1
            # the source keeps the gaps, a span becomes its sentinel; the target lists each
            # sentinel then the tokens it hid
            src = np.where(starts, sentinels[span_index], tokens)[~is_noise | starts]
            tgt = np.insert(tokens[is_noise], np.flatnonzero(starts[is_noise]), sentinels)
            src_rows.append(np.concatenate([src, [EOS_ID]]))
            tgt_rows.append(np.concatenate([[BOS_ID], tgt, [EOS_ID]]))
        src, tgt = np.asarray(src_rows, np.int32), np.asarray(tgt_rows, np.int32)
        loss_mask = np.ones(tgt.shape, np.float32)
        loss_mask[:, 0] = 0.0  # <bos> is given, never predicted
        return {"src": src, "src_valid": np.ones(src.shape, np.float32), "tgt": tgt,
                "loss_mask": loss_mask}

    def eval_set(self, task) -> EvalSet:
        arrays = {"tokens": task.rows("validation", task.eval_rows())[0][:, :-1]}
        return EvalSet([], self.randomize(task, arrays, self.eval_rng(task)))

    def loss(self, model, batch, *, deterministic=True, rngs=None):
        tgt_bt = batch["tgt"]
        logits_btv = model(batch["src"], batch["src_valid"], tgt_bt[:, :-1],
                           deterministic=deterministic, rngs=rngs)
        return next_token_loss(logits_btv, tgt_bt, batch["loss_mask"])

