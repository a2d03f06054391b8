"""Synthetic, verifiable tasks. A task samples problems, renders them as prompt + answer text,
keeps a held-out split that training never sees, and checks a completion by exact match."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from jaxformer.config import TaskConfig
from jaxformer.data.tokenizers import char_tokenizer

HELDOUT_PER_MILLE = 20  # 2% of all problems are reserved for evaluation


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a cheap, well-spread hash of uint64 values."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def difficulty(self) -> int:
        """Digits of the longer operand."""
        return max(len(str(self.a)), len(str(self.b)))


class AdditionTask:
    """'a+b=' -> the digits of a+b (reversed when `reverse_answer`), operands of 1..max_digits digits."""

    alphabet = "0123456789+="

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        self.tokenizer: Tokenizer = char_tokenizer(self.alphabet)
        # <bos> a + b = answer <eos>: the longest answer has max_digits + 1 digits
        self.prompt_len = 1 + 2 * cfg.max_digits + 2
        self.seq_len = self.prompt_len + cfg.max_digits + 2

    # -- problems -------------------------------------------------------------------------------
    def is_heldout(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        key = (np.asarray(a, np.uint64) << np.uint64(32)) | np.asarray(b, np.uint64)
        key = key ^ _mix64(np.asarray(self.cfg.split_seed, np.uint64))
        return _mix64(key) % np.uint64(1000) < HELDOUT_PER_MILLE

    def _draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """n operand pairs, each operand's digit count uniform in [min_digits, max_digits]."""
        def operand() -> np.ndarray:
            digits = rng.integers(self.cfg.min_digits, self.cfg.max_digits + 1, size=n)
            low = np.where(digits == 1, 0, 10 ** (digits - 1))
            return rng.integers(low, 10**digits)
        return operand(), operand()

    def sample_train(self, rng: np.random.Generator, n: int) -> list[Problem]:
        """n fresh training problems (repeats allowed), never from the held-out split."""
        problems: list[Problem] = []
        while len(problems) < n:
            a, b = self._draw(rng, 2 * n)
            keep = ~self.is_heldout(a, b)
            problems += [Problem(x, y) for x, y in zip(a[keep].tolist(), b[keep].tolist())]
        return problems[:n]

    def _unique(self, rng: np.random.Generator, n: int, heldout: bool, what: str) -> list[Problem]:
        chosen: dict[tuple[int, int], None] = {}
        for _ in range(1000):
            a, b = self._draw(rng, 4 * n)
            keep = self.is_heldout(a, b) == heldout
            for pair in zip(a[keep].tolist(), b[keep].tolist()):
                chosen.setdefault(pair)
                if len(chosen) == n:
                    return [Problem(x, y) for x, y in chosen]
        raise ValueError(
            f"{what}={n} exceeds the distinct problems with {self.cfg.min_digits}-"
            f"{self.cfg.max_digits} digits ({len(chosen)} found): lower it or raise task.max_digits"
        )

    def train_problems(self, n: int, seed: int) -> list[Problem]:
        """n unique training problems (a fixed training set of size n)."""
        return self._unique(np.random.default_rng([self.cfg.split_seed, seed, 1]), n, False,
                            "task.train_size")

    def eval_problems(self) -> list[Problem]:
        """The held-out set: fixed by task.split_seed, disjoint from every training problem."""
        rng = np.random.default_rng([self.cfg.split_seed, 2])
        return self._unique(rng, self.cfg.eval_size, True, "task.eval_size")

    # -- text -----------------------------------------------------------------------------------
    def prompt(self, problem: Problem) -> str:
        width = self.cfg.max_digits if self.cfg.pad_operands else 0
        return f"{problem.a:0{width}d}+{problem.b:0{width}d}=" if width else f"{problem.a}+{problem.b}="

    def answer(self, problem: Problem) -> str:
        width = self.cfg.max_digits + 1 if self.cfg.pad_operands else 0
        digits = f"{problem.a + problem.b:0{width}d}" if width else str(problem.a + problem.b)
        return digits[::-1] if self.cfg.reverse_answer else digits

    def parse(self, completion: str) -> int | None:
        """The number a completion states, or None if it is not a number."""
        text = completion.strip()
        if not text.isdigit():
            return None
        return int(text[::-1] if self.cfg.reverse_answer else text)

    def check(self, problem: Problem, completion: str) -> bool:
        """Exact match of the answer text (so '0012' for 2100 reversed is wrong: digits are exact)."""
        return completion.strip() == self.answer(problem)


def build_task(cfg: TaskConfig) -> AdditionTask:
    return {"addition": AdditionTask}[cfg.name](cfg)
