"""Language modelling on a prepared corpus (`python -m jaxformer.prepare`): rows packed from
consecutive documents, with the segment ids and positions that keep each document to itself.

The shards hold every document's tokens followed by `<eos>`, concatenated (data/prepare.py). Row r
of a split is the window of `seq_len + 1` tokens starting at token r * seq_len: the model reads its
first seq_len tokens and predicts its last seq_len, so consecutive rows share one token and every
token but the first is predicted once per epoch. Within a row, a token's segment is the document it
belongs to and its position counts from the start of that document or of the row, whichever is
later (so positions never exceed seq_len, whatever a document's length). With
task.document_masking=false every row is one segment with positions 0..seq_len (GPT-2's packing).
"""

from __future__ import annotations

import zlib
from functools import cached_property
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from jaxformer.config import TaskConfig
from jaxformer.data.shards import MANIFEST, Shards, SplitShards
from jaxformer.data.tokenizers import token_byte_lengths
from jaxformer.errors import UserError


class TextSplit:
    """One split of a prepared corpus as rows (data/shards.py: the memory-mapped arrays)."""

    def __init__(self, shards: SplitShards):
        self.tokens = shards.tokens
        self.doc_starts = np.asarray(shards.docs, np.int64)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def n_rows(self, seq_len: int) -> int:
        """Whole windows of seq_len + 1 tokens (the last, partial one is left out)."""
        return max((self.n_tokens - 1) // seq_len, 0)

    def rows(self, rows_n: np.ndarray, seq_len: int, document_masking: bool):
        """(tokens, segment_ids, positions), each (N, seq_len + 1) int32, of rows `rows_n`."""
        starts_n = np.asarray(rows_n, np.int64) * seq_len
        index_nt = starts_n[:, None] + np.arange(seq_len + 1)
        tokens_nt = np.asarray(self.tokens[index_nt], np.int32)
        if not document_masking:
            zeros_nt = np.zeros(index_nt.shape, np.int32)
            return tokens_nt, zeros_nt, np.broadcast_to(np.arange(seq_len + 1, dtype=np.int32),
                                                        index_nt.shape).copy()
        doc_nt = np.searchsorted(self.doc_starts, index_nt, side="right") - 1
        begins_nt = np.maximum(self.doc_starts[doc_nt], starts_n[:, None])
        segments_nt = (doc_nt - doc_nt[:, :1]).astype(np.int32)  # 0 for the row's first document
        return tokens_nt, segments_nt, (index_nt - begins_nt).astype(np.int32)


class TextTask:
    """task=text: rows of a prepared corpus. `train_rows` (the pipeline reads rows lazily, by
    index, in a seeded order that changes every epoch) and `eval_rows()` (the first eval_size
    validation rows, in order)."""

    num_classes = 0  # no labels: language modelling
    input_dim = None

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        if not (Path(cfg.data_dir) / MANIFEST).is_file():
            raise UserError(f"task.data_dir={cfg.data_dir} holds no prepared corpus (no "
                            f"{MANIFEST}): run python -m jaxformer.prepare data.out_dir="
                            f"{cfg.data_dir} (data=python_stdlib: the default corpus)")
        self.shards = Shards.open(cfg.data_dir)
        self.tokenizer: Tokenizer = self.shards.tokenizer
        self.seq_len = cfg.seq_len
        self.splits = {split: TextSplit(shards) for split, shards in self.shards.splits.items()}
        if self.splits["validation"].n_rows(self.seq_len) < 1:
            raise UserError(
                f"the validation split of {cfg.data_dir} has "
                f"{self.splits['validation'].n_tokens} tokens, fewer than one row of "
                f"task.seq_len={self.seq_len} + 1: lower task.seq_len or raise "
                "data.validation_fraction")

    @property
    def train_rows(self) -> int:
        return self.splits["train"].n_rows(self.seq_len)

    def rows(self, split: str, rows_n: np.ndarray):
        """(tokens, segment_ids, positions) of rows `rows_n` of `split`, (N, seq_len + 1) each."""
        return self.splits[split].rows(rows_n, self.seq_len, self.cfg.document_masking)

    def eval_rows(self) -> np.ndarray:
        return np.arange(min(self.cfg.eval_size, self.splits["validation"].n_rows(self.seq_len)))

    def reference_bpb(self, targets_nt: np.ndarray) -> dict[str, float]:
        """Bits per byte of two baselines on held-out target tokens `targets_nt`, the bytes a
        model's bpb is measured on: a unigram model of the training tokens (add-one smoothed: its
        cross-entropy per token over the targets' bytes), and zlib at level 9 on their text."""
        flat = np.asarray(targets_nt).reshape(-1)
        counts = np.bincount(np.asarray(self.splits["train"].tokens), minlength=len(self.token_bytes))
        log2_p = np.log2(counts + 1.0) - np.log2(counts.sum() + len(counts))
        n_bytes = int(self.token_bytes[flat].sum())
        # decoded whole: a row boundary inside a character's bytes must not become U+FFFD
        text = self.tokenizer.decode(flat.tolist())
        return {"unigram_bpb": float(-log2_p[flat].sum() / n_bytes),
                "zlib_bpb": 8.0 * len(zlib.compress(text.encode("utf-8"), 9)) / n_bytes}

    @cached_property
    def text_token_ids(self) -> np.ndarray:
        """The ids that stand for text (not <eos> or other special tokens)."""
        return np.flatnonzero(self.token_bytes > 0)

    @cached_property
    def token_bytes(self) -> np.ndarray:
        """(vocab,) int32: the UTF-8 bytes each token id decodes to (bits per byte)."""
        return token_byte_lengths(self.tokenizer)

