"""clm: next-token prediction on `<bos> prompt answer <eos>`, the decoder's objective.

Batch: tokens (B, seq_len) `<bos> prompt answer <eos> <pad>...`, loss_mask (B, seq_len) 1 on the
answer and <eos>. The model reads tokens[:, :-1] and predicts tokens[:, 1:] weighted by
loss_mask[:, 1:]. The greedy answer continues `<bos> prompt` (held-out rows fill the training
sequence length, as teacher forcing sees them).
"""

from __future__ import annotations

import numpy as np

from jaxformer.data.tokenizers import BOS_ID, EOS_ID, PAD_ID, encode_text
from jaxformer.objectives.base import (
    Arrays, EvalSet, GenerativeObjective, from_start, next_token_loss, pad_rows, text_ids,
)


class CausalLM(GenerativeObjective):
    name = "clm"

    def max_positions(self, task) -> int:
        return task.seq_len

    def encode(self, task, problems) -> Arrays:
        prompts, answers = text_ids(task, problems)
        tokens, valid = pad_rows([[BOS_ID, *p, *a, EOS_ID] for p, a in zip(prompts, answers)],
                                 task.seq_len)
        prompt_lens = np.array([1 + len(p) for p in prompts], np.int32)
        return {"tokens": tokens, "loss_mask": from_start(prompt_lens, valid)}

    def loss(self, model, batch, *, deterministic=True, rngs=None):
        tokens_bt = batch["tokens"]
        logits_btv = model(tokens_bt[:, :-1], deterministic=deterministic, rngs=rngs)
        return next_token_loss(logits_btv, tokens_bt, batch["loss_mask"])

    def eval_set(self, task) -> EvalSet:
        data = super().eval_set(task)
        examples = data.examples
        # the prompt ends where the answer's loss mask starts
        prompt_lens = np.argmax(examples["loss_mask"] > 0, axis=1).astype(np.int32)
        prompt_bp = examples["tokens"][:, : task.prompt_len]
        prompts = np.where(np.arange(task.prompt_len) < prompt_lens[:, None], prompt_bp, PAD_ID)
        data.decode_inputs = {"prompts": prompts.astype(np.int32), "prompt_lens": prompt_lens}
        return data

    def prompt_len(self, task) -> int:
        return task.prompt_len

    def frame_prompt(self, tokenizer, text, max_len):
        return encode_text(tokenizer, text, "prompt", bos=True, eos=False, max_len=max_len), ()

    def prompts(self, inputs, size):
        # batch-padding rows get the longest prompt length: any valid length would do
        lens = inputs["prompt_lens"]
        lens = np.where(np.arange(len(lens)) < size, lens, lens[:size].max())
        return inputs["prompts"], lens, ()

    def answer_budget(self, data):
        total_len = data.examples["tokens"].shape[1]
        return total_len - int(data.decode_inputs["prompt_lens"].min()), total_len
