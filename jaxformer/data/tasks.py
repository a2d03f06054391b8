"""Synthetic, verifiable tasks. A task samples problems, renders them as prompt + answer text,
keeps a held-out split that training never sees, and checks a completion by exact match.

Tasks (`build_task` maps task.name):
  addition   "007+042=" -> "9400"   digits of a+b, reversed / zero-padded per config
  reverse    "3141="    -> "1413"   the sequence reversed
  sort       "3141="    -> "1134"   the sequence sorted (symbol order 0-9a-z)
  is_sorted  "3141="    -> "0"      1 if non-decreasing else 0; also a 2-class classification task
  (teacher: real-valued feature vectors, in data/vectors.py)

Internally a batch of problems is an int64 array of "codes", one row per problem (addition: a, b;
sequences: symbol indices padded with -1). A hash of the row decides the held-out split, so the
split is a property of the problem alone: no training path can produce a held-out problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from math import comb

import numpy as np
from tokenizers import Tokenizer

from jaxformer.config import TaskConfig
from jaxformer.data.tokenizers import char_tokenizer
from jaxformer.data.text import TextTask
from jaxformer.data.vectors import VECTOR_TASKS, TeacherTask
from jaxformer.errors import UserError

SYMBOLS = "0123456789abcdefghijklmnopqrstuvwxyz"  # sequence tasks use the first task.n_symbols
MIN_HELDOUT_SHARE = 0.02  # at least 2% of the problems are reserved for evaluation...
MAX_HELDOUT_SHARE = 0.5  # ...more in small spaces when eval_size needs it, but never over half
LISTABLE = 1 << 20  # spaces up to this many problems are listed in full: exact counts, exhaustive sets
SAMPLING_ROUNDS = 20  # draw rounds spent collecting unique problems before giving up / listing


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a cheap, well-spread hash of uint64 values."""
    x = np.asarray(x).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@dataclass(frozen=True)
class AdditionProblem:
    a: int
    b: int

    @property
    def difficulty(self) -> int:
        """Digits of the longer operand."""
        return max(len(str(self.a)), len(str(self.b)))


@dataclass(frozen=True)
class SequenceProblem:
    symbols: str  # e.g. "3141"

    @property
    def difficulty(self) -> int:
        """Length of the sequence."""
        return len(self.symbols)


Problem = AdditionProblem | SequenceProblem


class Task:
    """A problem space with a held-out split, a text format and an exact-match check.

    Subclasses set `alphabet`, `difficulty_unit`, `prompt_chars`, `answer_chars` and implement
    the code hooks (`_draw`, `_count`, `_list`, `_problem`, `_code`, `_describe`) and the text
    (`prompt`, `answer`); classification tasks also set `num_classes` and implement `_labels`
    and `label`.
    """

    alphabet: str  # every character prompts and answers use
    num_classes = 0  # > 0: a classification task, the label is also the answer text
    difficulty_unit: str  # what difficulty counts, for metric names: exact_match_3digit
    prompt_chars: int  # longest prompt, in characters
    answer_chars: int  # longest answer, in characters

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        self.tokenizer: Tokenizer = char_tokenizer(self.alphabet)
        self.heldout_share = self._heldout_share()

    # -- token lengths the pipelines pad to (all include the special tokens) ---------------------
    @property
    def prompt_len(self) -> int:
        return 1 + self.prompt_chars  # <bos> prompt

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.answer_chars + 1  # <bos> prompt answer <eos>

    @property
    def cls_len(self) -> int:
        return self.prompt_len + 1  # <bos> prompt <eos>: the classification input

    @property
    def src_len(self) -> int:
        return self.prompt_chars + 1  # prompt <eos>: the seq2seq source

    @property
    def tgt_len(self) -> int:
        return self.answer_chars + 2  # <bos> answer <eos>: the seq2seq target

    @property
    def num_problems(self) -> int:
        """Distinct problems the task can pose."""
        return self._count(None)

    # -- text -------------------------------------------------------------------------------------
    def prompt(self, problem: Problem) -> str:
        raise NotImplementedError

    def answer(self, problem: Problem) -> str:
        raise NotImplementedError

    def label(self, problem: Problem) -> int:
        raise UserError(f"task {self.cfg.name!r} is not a classification task: it has no labels")

    def check(self, problem: Problem, completion: str) -> bool:
        """Exact match of the answer text (so '0012' for 2100 reversed is wrong: digits are exact)."""
        return completion.strip() == self.answer(problem)

    def difficulty(self, problem: Problem) -> int:
        return problem.difficulty

    # -- hooks on codes (int64 arrays, one row per problem) ---------------------------------------
    def _draw(self, rng: np.random.Generator, n: int, label: int | None) -> np.ndarray:
        """n random problems (repeats allowed); with `label`, only problems of that class."""
        raise NotImplementedError

    def _count(self, label: int | None) -> int:
        """Distinct problems (of class `label`)."""
        raise NotImplementedError

    def _list(self) -> np.ndarray:
        """Every problem; only called when num_problems <= LISTABLE."""
        raise NotImplementedError

    def _labels(self, codes: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _problem(self, row: list[int]) -> Problem:
        raise NotImplementedError

    def _code(self, problem: Problem) -> list[int]:
        raise NotImplementedError

    def _describe(self) -> tuple[str, str]:
        """The problem space and the keys that widen it, for error messages."""
        raise NotImplementedError

    # -- held-out split ---------------------------------------------------------------------------
    def _strata(self) -> list[int | None]:
        """Unique sets are drawn per class so classification sets stay balanced."""
        return list(range(self.num_classes)) or [None]

    def _heldout_share(self) -> float:
        """2% of the problems, or enough that every class holds twice its share of eval_size."""
        strata = self._strata()
        quota = -(-self.cfg.eval_size // len(strata))
        needed = max(2 * quota / self._count(label) for label in strata)
        return min(MAX_HELDOUT_SHARE, max(MIN_HELDOUT_SHARE, needed))

    def _is_heldout_codes(self, codes: np.ndarray) -> np.ndarray:
        hashes = np.full(len(codes), _mix64(self.cfg.split_seed), np.uint64)
        for column in np.ascontiguousarray(codes, np.int64).view(np.uint64).T:
            hashes = _mix64(hashes ^ column)
        return hashes % np.uint64(1_000_000) < np.uint64(round(self.heldout_share * 1_000_000))

    def is_heldout(self, problems: list[Problem]) -> np.ndarray:
        """(N,) bool: which problems belong to the held-out split."""
        return self._is_heldout_codes(np.array([self._code(p) for p in problems], np.int64))

    # -- sampling ---------------------------------------------------------------------------------
    def sample_train(self, rng: np.random.Generator, n: int) -> list[Problem]:
        """n fresh training problems (repeats allowed), never from the held-out split."""
        rows: list[list[int]] = []
        while len(rows) < n:
            codes = self._draw(rng, 2 * n, None)
            kept = codes[~self._is_heldout_codes(codes)].tolist()
            pool = None if kept else self._split_pool(False, None)
            # a tiny space the hash put wholly in the held-out split
            if pool is not None and not len(pool):
                space, widen = self._describe()
                raise UserError(f"every one of the {self.num_problems} problems {space} is held out, "
                                 f"none is left to train on: raise {widen}")
            rows += kept
        return [self._problem(row) for row in rows[:n]]

    def train_problems(self, n: int, seed: int) -> list[Problem]:
        """n unique training problems (a fixed training set of size n)."""
        rng = np.random.default_rng([self.cfg.split_seed, seed, 1])
        return self._unique(rng, n, False, "task.train_size")

    def eval_problems(self) -> list[Problem]:
        """The held-out set: fixed by task.split_seed, disjoint from every training problem."""
        rng = np.random.default_rng([self.cfg.split_seed, 2])
        return self._unique(rng, self.cfg.eval_size, True, "task.eval_size")

    def _unique(self, rng: np.random.Generator, n: int, heldout: bool, what: str) -> list[Problem]:
        strata = self._strata()
        quotas = [n // len(strata) + (i < n % len(strata)) for i in range(len(strata))]
        codes = np.concatenate([
            self._unique_codes(rng, quota, heldout, label, (what, n))
            for label, quota in zip(strata, quotas) if quota
        ])
        return [self._problem(row) for row in codes[rng.permutation(len(codes))].tolist()]

    def _split_pool(self, heldout: bool, label: int | None) -> np.ndarray | None:
        """Every problem of the split (and class), or None when the space is too large to list."""
        if self.num_problems > LISTABLE:
            return None
        codes = self._all_codes
        keep = self._is_heldout_codes(codes) == heldout
        if label is not None:
            keep &= self._labels(codes) == label
        return codes[keep]

    @cached_property
    def _all_codes(self) -> np.ndarray:
        return self._list()

    def _unique_codes(self, rng: np.random.Generator, n: int, heldout: bool, label: int | None,
                      request: tuple[str, int]) -> np.ndarray:
        share = self.heldout_share if heldout else 1.0 - self.heldout_share
        pool = self._split_pool(heldout, label)
        available = len(pool) if pool is not None else int(self._count(label) * share)
        if n > available:
            raise UserError(self._shortage(request, n, heldout, label, f"only {available} exist"))
        chosen: dict[tuple[int, ...], None] = {}
        for _ in range(SAMPLING_ROUNDS):
            codes = self._draw(rng, int(2 * (n - len(chosen)) / share) + 16, label)
            for row in map(tuple, codes[self._is_heldout_codes(codes) == heldout].tolist()):
                chosen.setdefault(row)
                if len(chosen) == n:
                    return np.array(list(chosen), np.int64)
        if pool is None:
            raise UserError(self._shortage(request, n, heldout, label,
                                            f"sampling found only {len(chosen)}"))
        # nearly all of a small space is wanted: rare problems are slow to draw, take them from the list
        missing = [row for row in map(tuple, pool.tolist()) if row not in chosen]
        for i in rng.permutation(len(missing))[: n - len(chosen)]:
            chosen.setdefault(missing[i])
        return np.array(list(chosen), np.int64)

    def _shortage(self, request: tuple[str, int], n: int, heldout: bool, label: int | None,
                  found: str) -> str:
        what, total = request
        split = "held-out" if heldout else "training"
        of_class = "" if label is None else f" with label {label}"
        space, widen = self._describe()
        return (
            f"{what}={total} needs {n} distinct {split} problems{of_class} but {found} "
            f"({self.heldout_share:.1%} of the {self._count(label)} problems{of_class} {space} "
            f"are held out): lower {what} or raise {widen}"
        )


class AdditionTask(Task):
    """'a+b=' -> the digits of a+b (reversed when `reverse_answer`), operands of
    min_digits..max_digits digits, zero-padded to max_digits when `pad_operands`."""

    alphabet = "0123456789+="
    difficulty_unit = "digit"

    @property
    def prompt_chars(self) -> int:
        return 2 * self.cfg.max_digits + 2

    @property
    def answer_chars(self) -> int:
        return self.cfg.max_digits + 1

    @property
    def _smallest_operand(self) -> int:
        return 0 if self.cfg.min_digits == 1 else 10 ** (self.cfg.min_digits - 1)

    def _count(self, label: int | None) -> int:
        return (10**self.cfg.max_digits - self._smallest_operand) ** 2

    def _list(self) -> np.ndarray:
        operands = np.arange(self._smallest_operand, 10**self.cfg.max_digits, dtype=np.int64)
        a, b = np.meshgrid(operands, operands, indexing="ij")
        return np.stack([a.ravel(), b.ravel()], axis=1)

    def _draw(self, rng: np.random.Generator, n: int, label: int | None) -> np.ndarray:
        """Each operand's digit count uniform in [min_digits, max_digits]."""
        def operand() -> np.ndarray:
            digits = rng.integers(self.cfg.min_digits, self.cfg.max_digits + 1, size=n)
            low = np.where(digits == 1, 0, 10 ** (digits - 1))
            return rng.integers(low, 10**digits)
        return np.stack([operand(), operand()], axis=1)

    def _problem(self, row: list[int]) -> AdditionProblem:
        return AdditionProblem(*row)

    def _code(self, problem: AdditionProblem) -> list[int]:
        return [problem.a, problem.b]

    def _describe(self) -> tuple[str, str]:
        return f"with {self.cfg.min_digits}-{self.cfg.max_digits} digit operands", "task.max_digits"

    def prompt(self, problem: AdditionProblem) -> str:
        width = self.cfg.max_digits if self.cfg.pad_operands else 0
        return f"{problem.a:0{width}d}+{problem.b:0{width}d}=" if width else f"{problem.a}+{problem.b}="

    def answer(self, problem: AdditionProblem) -> str:
        width = self.cfg.max_digits + 1 if self.cfg.pad_operands else 0
        digits = f"{problem.a + problem.b:0{width}d}" if width else str(problem.a + problem.b)
        return digits[::-1] if self.cfg.reverse_answer else digits


class SequenceTask(Task):
    """Prompt 'symbols=' for a sequence of min_length..max_length symbols, each uniform over the
    first n_symbols of SYMBOLS (lengths uniform too); subclasses define the answer."""

    difficulty_unit = "symbols"

    def __init__(self, cfg: TaskConfig):
        self.symbols = SYMBOLS[: cfg.n_symbols]
        self.alphabet = self.symbols + "="
        super().__init__(cfg)

    @property
    def prompt_chars(self) -> int:
        return self.cfg.max_length + 1

    @property
    def answer_chars(self) -> int:
        return self.cfg.max_length

    @property
    def _lengths(self) -> range:
        return range(self.cfg.min_length, self.cfg.max_length + 1)

    def _count(self, label: int | None) -> int:
        return sum(self.cfg.n_symbols**length for length in self._lengths)

    def _list(self) -> np.ndarray:
        n, width = self.cfg.n_symbols, self.cfg.max_length
        blocks = []
        for length in self._lengths:
            index = np.arange(n**length, dtype=np.int64)[:, None]
            digits = index // n ** np.arange(length - 1, -1, -1, dtype=np.int64) % n
            blocks.append(np.pad(digits, ((0, 0), (0, width - length)), constant_values=-1))
        return np.concatenate(blocks)

    def _draw(self, rng: np.random.Generator, n: int, label: int | None) -> np.ndarray:
        lengths = rng.integers(self.cfg.min_length, self.cfg.max_length + 1, size=n)
        symbols = rng.integers(0, self.cfg.n_symbols, size=(n, self.cfg.max_length))
        return np.where(np.arange(self.cfg.max_length) < lengths[:, None], symbols, -1)

    def _problem(self, row: list[int]) -> SequenceProblem:
        return SequenceProblem("".join(self.symbols[s] for s in row if s >= 0))

    def _code(self, problem: SequenceProblem) -> list[int]:
        padding = [-1] * (self.cfg.max_length - len(problem.symbols))
        return [self.symbols.index(char) for char in problem.symbols] + padding

    def _describe(self) -> tuple[str, str]:
        cfg = self.cfg
        space = f"of length {cfg.min_length}-{cfg.max_length} over {cfg.n_symbols} symbols"
        return space, "task.max_length or task.n_symbols"

    def prompt(self, problem: SequenceProblem) -> str:
        return problem.symbols + "="


class ReverseTask(SequenceTask):
    """'3141=' -> '1413'."""

    def answer(self, problem: SequenceProblem) -> str:
        return problem.symbols[::-1]


class SortTask(SequenceTask):
    """'3141=' -> '1134' (SYMBOLS order, which is also character order)."""

    def answer(self, problem: SequenceProblem) -> str:
        return "".join(sorted(problem.symbols))


class IsSortedTask(SequenceTask):
    """'3141=' -> '0', '1134=' -> '1': is the sequence non-decreasing? Half the problems are."""

    num_classes = 2

    @property
    def answer_chars(self) -> int:
        return 1

    def label(self, problem: SequenceProblem) -> int:
        return int(list(problem.symbols) == sorted(problem.symbols))

    def answer(self, problem: SequenceProblem) -> str:
        return str(self.label(problem))

    def _count(self, label: int | None) -> int:
        everything = super()._count(None)
        # non-decreasing sequences of length L over n symbols: multisets, C(n + L - 1, L)
        sorted_ones = sum(comb(self.cfg.n_symbols + length - 1, length) for length in self._lengths)
        return {None: everything, 1: sorted_ones, 0: everything - sorted_ones}[label]

    def _labels(self, codes: np.ndarray) -> np.ndarray:
        rising = (codes[:, 1:] >= codes[:, :-1]) | (codes[:, 1:] < 0)  # padding (-1) ends a row
        return rising.all(axis=1).astype(np.int64)

    def _draw(self, rng: np.random.Generator, n: int, label: int | None) -> np.ndarray:
        """Labels uniform (or `label`); sorted rows are sorted draws, unsorted rows are redrawn
        until they are unsorted."""
        labels = np.full(n, label) if label is not None else rng.integers(0, 2, size=n)
        codes = super()._draw(rng, n, None)
        padded_high = np.where(codes < 0, self.cfg.n_symbols, codes)  # keep padding at the end
        ascending = np.sort(padded_high, axis=1)
        codes = np.where(labels[:, None] == 1, np.where(ascending == self.cfg.n_symbols, -1, ascending),
                         codes)
        redraw = self._labels(codes) != labels
        while redraw.any():
            codes[redraw] = super()._draw(rng, int(redraw.sum()), None)
            redraw = self._labels(codes) != labels
        return codes


TASKS: dict[str, type[Task]] = {
    "addition": AdditionTask, "reverse": ReverseTask, "sort": SortTask, "is_sorted": IsSortedTask,
}


def build_task(cfg: TaskConfig) -> Task | TeacherTask | TextTask:
    """A synthetic token task (this module), a feature-vector task (data/vectors.py) or a
    prepared text corpus (data/text.py)."""
    return {**TASKS, **VECTOR_TASKS, "text": TextTask}[cfg.name](cfg)
