"""classification: a sequence classifier (the encoder's pooled head, or the decoder's head on its
last token) predicts a classification task's label.

Batch: tokens (B, cls_len) `<bos> prompt <eos> <pad>...`, valid (B, cls_len), label (B,). The
greedy answer is the most likely label, as text (a classification task's answer is its label).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.data.pipeline import padded_batches
from jaxformer.data.tokenizers import BOS_ID, EOS_ID
from jaxformer.errors import UserError
from jaxformer.objectives.base import Arrays, Objective, classification_loss, pad_rows, text_ids
from jaxformer.parallel import to_host


class Classification(Objective):
    name = "classification"
    classifies = True

    def check(self, task, model_cfg=None) -> None:
        super().check(task, model_cfg)
        if not task.num_classes:
            raise UserError(f"the classification objective needs a classification task such as "
                            f"is_sorted, not {task.cfg.name!r}")

    def max_positions(self, task) -> int:
        return task.cls_len

    def encode(self, task, problems) -> Arrays:
        prompts, _ = text_ids(task, problems)
        tokens, valid = pad_rows([[BOS_ID, *p, EOS_ID] for p in prompts], task.cls_len)
        labels = np.array([task.label(p) for p in problems], np.int32)
        return {"tokens": tokens, "valid": valid, "label": labels}

    def loss(self, model, batch, *, deterministic=True, rngs=None):
        kw = {"deterministic": deterministic, "rngs": rngs}
        hidden_btd = model.hidden(batch["tokens"], batch["valid"], **kw)
        return classification_loss(model.classify(hidden_btd, batch["valid"], **kw), batch["label"])

    def greedy_answers(self, model, data, task, batch_size) -> list[str]:
        arrays = {"tokens": data.examples["tokens"], "valid": data.examples["valid"]}
        graphdef, state = nnx.split(model)
        labels: list[str] = []
        for batch, size in padded_batches(arrays, batch_size):
            predicted = to_host(_predictions(graphdef, state, batch["tokens"], batch["valid"]))
            labels += [str(label) for label in predicted[:size]]
        return labels


@partial(jax.jit, static_argnames=("graphdef",))
def _predictions(graphdef, state, tokens_bt, valid_bt):
    model = nnx.merge(graphdef, state)
    return jnp.argmax(model.classify(model.hidden(tokens_bt, valid_bt), valid_bt), axis=-1)
