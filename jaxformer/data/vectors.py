"""Synthetic tasks on real-valued feature vectors, for models without tokens (model.kind=mlp).

  teacher   x ~ N(0, I) in task.input_dim dimensions, label = argmax of a fixed random teacher
            network's logits, W2 tanh(W1 x) - b (task.teacher_width hidden units, task.num_classes
            outputs); the offsets b balance the classes, the tanh makes the boundaries curved.

A vector task offers what the grain pipeline (data/pipeline.py) asks of a token task, with batches
of arrays instead of problem lists: `sample_train(rng, n)`, `train_problems(n, seed)` and
`eval_problems()` return {"features": (n, input_dim) float32, "label": (n,) int32}. The teacher's
weights and the held-out set come from task.split_seed alone; training draws use other seeds, and
a continuous space makes a repeat of a held-out point a probability-zero event.
"""

from __future__ import annotations

import numpy as np

from jaxformer.config import TaskConfig

Examples = dict[str, np.ndarray]
BALANCING_SAMPLE = 20_000  # points used once to place the class offsets
# teacher pre-activations have std TEACHER_GAIN: the tanh units bend, so a linear classifier gets
# about 75% of 4 balanced classes (85% at gain 1) and the student needs its hidden layers
TEACHER_GAIN = 2.0


class TeacherTask:
    tokenizer = None  # no text: nothing to save, no completions to check

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.input_dim = cfg.input_dim
        rng = np.random.default_rng([cfg.split_seed, 3])
        self.w_in_dh = (TEACHER_GAIN / np.sqrt(cfg.input_dim)
                        * rng.standard_normal((cfg.input_dim, cfg.teacher_width)))
        self.w_out_hc = rng.standard_normal((cfg.teacher_width, cfg.num_classes)) / np.sqrt(cfg.teacher_width)
        self.offset_c = np.zeros(cfg.num_classes)
        reference = self._logits(rng.standard_normal((BALANCING_SAMPLE, cfg.input_dim)))
        self.offset_c = _balancing_offsets(reference)

    def _logits(self, x_nd: np.ndarray) -> np.ndarray:
        return np.tanh(x_nd @ self.w_in_dh) @ self.w_out_hc - self.offset_c

    def _examples(self, rng: np.random.Generator, n: int) -> Examples:
        x_nd = rng.standard_normal((n, self.input_dim))
        labels = np.argmax(self._logits(x_nd), axis=1)
        return {"features": x_nd.astype(np.float32), "label": labels.astype(np.int32)}

    def sample_train(self, rng: np.random.Generator, n: int) -> Examples:
        return self._examples(rng, n)

    def train_problems(self, n: int, seed: int) -> Examples:
        """A fixed training set of n points (task.train_size)."""
        return self._examples(np.random.default_rng([self.cfg.split_seed, seed, 1]), n)

    def eval_problems(self) -> Examples:
        return self._examples(np.random.default_rng([self.cfg.split_seed, 2]), self.cfg.eval_size)


def _balancing_offsets(logits_nc: np.ndarray, rounds: int = 200) -> np.ndarray:
    """Offsets b with argmax(logits - b) about uniform over classes: raise the offset of classes
    that win too often, in shrinking steps."""
    n, classes = logits_nc.shape
    offset_c = np.zeros(classes)
    step = logits_nc.std()
    for _ in range(rounds):
        share_c = np.bincount(np.argmax(logits_nc - offset_c, axis=1), minlength=classes) / n
        offset_c += step * (share_c - 1.0 / classes)
        step *= 0.97
    return offset_c


VECTOR_TASKS = {"teacher": TeacherTask}
