"""seq2seq: the encoder-decoder reads the prompt and predicts the answer after `<bos>`.

Batch: src (B, src_len) `prompt <eos> <pad>...`, src_valid (B, src_len) 1 on real tokens;
tgt (B, tgt_len) `<bos> answer <eos> <pad>...`, loss_mask (B, tgt_len) 1 on the answer and <eos>;
the decoder reads tgt[:, :-1] and predicts tgt[:, 1:] as in clm. The greedy answer is decoded from
`<bos>` given the source.
"""

from __future__ import annotations

import numpy as np

from jaxformer.data.tokenizers import BOS_ID, EOS_ID, encode_text
from jaxformer.models.decoding import bos_prompts
from jaxformer.models.flops import train_flops_per_example
from jaxformer.objectives.base import (
    Arrays, EvalSet, GenerativeObjective, from_start, next_token_loss, pad_rows, text_ids,
)


class Seq2Seq(GenerativeObjective):
    name = "seq2seq"

    def max_positions(self, task) -> int:
        return max(task.src_len, task.tgt_len)

    def train_flops_per_example(self, model_cfg, task) -> float | None:
        return train_flops_per_example(model_cfg, task.tgt_len, source_positions=task.src_len)

    def encode(self, task, problems) -> Arrays:
        prompts, answers = text_ids(task, problems)
        src, src_valid = pad_rows([[*p, EOS_ID] for p in prompts], task.src_len)
        tgt, tgt_valid = pad_rows([[BOS_ID, *a, EOS_ID] for a in answers], task.tgt_len)
        loss_mask = from_start(np.ones(len(problems), np.int32), tgt_valid)  # every target but <bos>
        return {"src": src, "src_valid": src_valid, "tgt": tgt, "loss_mask": loss_mask}

    def loss(self, model, batch, *, deterministic=True, rngs=None):
        tgt_bt = batch["tgt"]
        logits_btv = model(batch["src"], batch["src_valid"], tgt_bt[:, :-1],
                           deterministic=deterministic, rngs=rngs)
        return next_token_loss(logits_btv, tgt_bt, batch["loss_mask"])

    def eval_set(self, task) -> EvalSet:
        data = super().eval_set(task)
        data.decode_inputs = {"src": data.examples["src"], "src_valid": data.examples["src_valid"]}
        return data

    def prompt_len(self, task) -> int:
        return 1  # the decoder side: <bos>

    def frame_prompt(self, tokenizer, text, max_len):
        src = encode_text(tokenizer, text, "prompt", bos=False, eos=True, max_len=max_len)
        return [BOS_ID], (np.asarray([src]), np.ones((1, len(src)), np.int32))

    def prompts(self, inputs, size):
        prompts_b1, lens_b = bos_prompts(len(inputs["src"]))
        return prompts_b1, lens_b, (inputs["src"], inputs["src_valid"])

    def answer_budget(self, data):
        return data.examples["tgt"].shape[1] - 1, None  # after <bos>
