"""text_mlm: BERT's masked language modelling on packed rows of a prepared corpus (task=text, the
encoder).

Batch: targets (B, seq_len) the first seq_len tokens of a row (data/text.py), segment_ids and
positions (B, seq_len): with document masking no token attends across a document boundary and
positions restart at each document; inputs (B, seq_len) the targets corrupted as BERT does (15%
of the tokens that stand for text, never <eos> or other special tokens: 80% <mask>, 10% a random
text token, 10% kept), loss_mask (B, seq_len) 1 at the selected positions, drawn per batch.
Evaluation: the loss, accuracy and perplexity at the masked positions.
"""

from __future__ import annotations

import numpy as np

from jaxformer.data.tokenizers import MASK, MASK_ID
from jaxformer.errors import UserError
from jaxformer.objectives.base import Arrays, CorpusObjective, EvalSet, token_loss
from jaxformer.objectives.mlm import bert_corruption


class TextMaskedLM(CorpusObjective):
    name = "text_mlm"
    randomizes = True

    def check(self, task, model_cfg=None) -> None:
        super().check(task, model_cfg)
        if task.tokenizer.token_to_id(MASK) != MASK_ID:
            raise UserError(f"masked LM needs {MASK} at id {MASK_ID} in the corpus' tokenizer "
                            f"({task.cfg.data_dir}): prepare it with a trained BPE "
                            "(tokenizer.path=null)")

    def max_positions(self, task) -> int:
        return task.seq_len

    def encode(self, task, rows) -> Arrays:
        return self._rows(task, "train", rows)

    @staticmethod
    def _rows(task, split: str, rows) -> Arrays:
        tokens, segment_ids, positions = task.rows(split, rows)
        return {"targets": tokens[:, :-1], "segment_ids": segment_ids[:, :-1],
                "positions": positions[:, :-1]}

    def randomize(self, task, arrays, rng) -> Arrays:
        targets = arrays["targets"]
        text_ids = task.text_token_ids
        inputs, selected = bert_corruption(
            targets, task.token_bytes[targets] > 0, task.cfg.mask_prob, rng,
            lambda shape: text_ids[rng.integers(0, len(text_ids), size=shape)])
        return {**arrays, "inputs": inputs, "loss_mask": selected.astype(np.float32)}

    def eval_set(self, task) -> EvalSet:
        return EvalSet([], self.eval_arrays(task, task.eval_rows()))

    def eval_arrays(self, task, rows) -> Arrays:
        arrays = self._rows(task, "validation", rows)
        return self.randomize(task, arrays, self.eval_rng(task))

    def loss(self, model, batch, *, deterministic=True, rngs=None):
        hidden_btd = model(batch["inputs"], segment_ids_bt=batch["segment_ids"],
                           positions_bt=batch["positions"], deterministic=deterministic, rngs=rngs)
        return token_loss(model.mlm_logits(hidden_btd), batch["targets"], batch["loss_mask"])

