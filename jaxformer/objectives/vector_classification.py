"""vector_classification: the plain MLP classifies real-valued feature vectors (data/vectors.py).

Batch: features (B, input_dim) float32, label (B,) int32, drawn as arrays by the task itself.
There is no answer text: evaluation reports loss and accuracy only.
"""

from __future__ import annotations

from jaxformer.errors import UserError
from jaxformer.objectives.base import Arrays, EvalSet, Objective, classification_loss


class VectorClassification(Objective):
    name = "vector_classification"
    classifies = True
    text_answers = False

    def check(self, task, model_cfg=None) -> None:
        if task.tokenizer is not None:
            raise UserError(f"the vector_classification objective reads feature vectors, but task "
                            f"{task.cfg.name!r} gives tokens: use a vector task such as teacher")

    def max_positions(self, task) -> int:
        return 1  # one input vector per example

    def encode(self, task, examples) -> Arrays:
        return examples  # a vector task draws its examples as arrays already

    def eval_set(self, task) -> EvalSet:
        return EvalSet([], task.eval_problems())  # no problem texts to complete

    def loss(self, model, batch, *, deterministic=True, rngs=None):
        logits_bc = model(batch["features"], deterministic=deterministic, rngs=rngs)
        return classification_loss(logits_bc, batch["label"])

    def greedy_answers(self, model, data, task, batch_size) -> list[str]:
        return []
