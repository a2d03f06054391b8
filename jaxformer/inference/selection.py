"""Test-time selection from n samples per problem: pass@k, majority@k, best-of-k by the model's
log-probability, and best-of-k with a simulated verifier.

Inputs are per-problem arrays over the samples, shaped (P, n): whether each sample is correct,
its answer text (or an answer id), its log-probability. Each metric is the expected accuracy of
the strategy when it sees k of the n samples, drawn uniformly without replacement, per problem
(average over problems for the headline number):

  pass@k        some of the k is correct: the unbiased estimator of Chen et al. (2021), exact.
  majority@k    the most frequent answer among the k (ties broken uniformly at random) is correct;
                estimated by resampling k of the n (seeded), as there is no cheap closed form.
  best_logprob@k  the k-subset's sample of highest log-probability is correct; exact (ties in
                log-probability go to the earlier sample).
  verifier@k    a verifier accepts every correct sample and each wrong one with probability eps
                (its false-positive rate); the pick is uniform among the accepted ones, and when it
                accepts none, the highest log-probability sample. Exact: since every correct
                sample is accepted, the fallback only ever picks among wrong samples, so the
                accuracy is E[c' / (c' + X)] over c' ~ Hypergeometric(n, c, k) correct in the
                subset and X ~ Binomial(k - c', eps) wrongly accepted. eps=0 gives pass@k,
                eps=1 a uniform pick (c / n).
"""

from __future__ import annotations

from math import comb

import numpy as np


def pass_at_k(n, c, k: int) -> np.ndarray:
    """Unbiased pass@k per problem, 1 - C(n-c, k) / C(n, k), in the numerically stable product
    form 1 - prod_{i=n-c+1}^{n} (1 - k / i). `n` (samples) and `c` (correct ones) broadcast."""
    n, c = np.broadcast_arrays(np.asarray(n, np.int64), np.asarray(c, np.int64))
    if np.any(c < 0) or np.any(c > n):
        raise ValueError("pass_at_k needs 0 <= c <= n for every problem")
    if k < 1 or np.any(k > n):
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got k={k} and n down to {n.min()}")
    i = np.arange(1, n.max() + 1)
    in_product = (i > (n - c)[..., None]) & (i <= n[..., None])
    return 1.0 - np.prod(np.where(in_product, 1.0 - k / i, 1.0), axis=-1)


def answer_ids(answers: list[list[str]]) -> np.ndarray:
    """(P, n) ids of the answer texts, equal ids for equal texts within a problem."""
    return np.asarray([np.unique(np.asarray(row, dtype=object).astype(str), return_inverse=True)[1]
                       for row in answers], np.int64).reshape(len(answers), -1)


def majority_at_k(ids: np.ndarray, correct: np.ndarray, k: int, resamples: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Expected accuracy (P,) of a majority vote over k of the n samples: `resamples` draws of k
    distinct samples per problem, the most frequent answer id wins, ties uniformly at random."""
    problems, n = ids.shape
    _check_k(k, n)
    accuracy = np.empty(problems)
    for p in range(problems):
        answer_correct = np.zeros(ids[p].max() + 1, bool)
        answer_correct[ids[p]] = correct[p]  # equal answers are equally correct
        draws_rk = np.argsort(rng.random((resamples, n)), axis=1)[:, :k]
        votes_ra = np.zeros((resamples, answer_correct.size))
        np.add.at(votes_ra, (np.arange(resamples)[:, None], ids[p][draws_rk]), 1.0)
        jitter = rng.random(votes_ra.shape) * 0.5  # < 1 vote: decides ties only
        accuracy[p] = answer_correct[np.argmax(votes_ra + jitter, axis=1)].mean()
    return accuracy


def best_logprob_at_k(logprobs: np.ndarray, correct: np.ndarray, k: int) -> np.ndarray:
    """Expected accuracy (P,) of keeping the highest log-probability sample among k of n: the
    sample ranked r (0 = most likely) is the subset's best with probability C(n-1-r, k-1) / C(n, k)."""
    problems, n = logprobs.shape
    _check_k(k, n)
    order = np.argsort(-logprobs, axis=1, kind="stable")
    weights = np.asarray([comb(n - 1 - r, k - 1) / comb(n, k) for r in range(n)])
    return (np.take_along_axis(correct, order, axis=1) * weights).sum(axis=1)


def verifier_at_k(correct: np.ndarray, k: int, eps: float) -> np.ndarray:
    """Expected accuracy (P,) of best-of-k with a verifier of false-positive rate `eps` (see the
    module docstring for the rule and why its fallback never changes the accuracy)."""
    problems, n = correct.shape
    _check_k(k, n)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"verifier eps={eps} must be in [0, 1]")
    c = correct.sum(axis=1)
    accuracy = np.zeros(problems)
    for j in range(1, k + 1):  # j correct samples among the k
        hypergeom = np.asarray([comb(ci, j) * comb(n - ci, k - j) / comb(n, k) for ci in c])
        wrong = k - j
        x = np.arange(wrong + 1)
        binom = np.asarray([comb(wrong, xi) for xi in x]) * eps ** x * (1 - eps) ** (wrong - x)
        accuracy += hypergeom * float(np.sum(binom * j / (j + x)))
    return accuracy


def _check_k(k: int, n: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of samples n={n}")


def ks_up_to(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks = [2**i for i in range(n.bit_length()) if 2**i <= n]
    return ks if ks[-1] == n else [*ks, n]


def selection_metrics(correct: np.ndarray, logprobs: np.ndarray, answers: list[list[str]],
                      verifier_eps: list[float], resamples: int, seed: int) -> dict[str, float]:
    """Every strategy at every k in `ks_up_to(n)`, averaged over problems."""
    correct = np.asarray(correct, bool)
    logprobs = np.asarray(logprobs, np.float64)
    n = correct.shape[1]
    ids = answer_ids(answers)
    rng = np.random.default_rng(seed)
    metrics: dict[str, float] = {"sample_accuracy": float(correct.mean())}
    for k in ks_up_to(n):
        metrics[f"pass@{k}"] = float(pass_at_k(n, correct.sum(axis=1), k).mean())
        metrics[f"majority@{k}"] = float(majority_at_k(ids, correct, k, resamples, rng).mean())
        metrics[f"best_logprob@{k}"] = float(best_logprob_at_k(logprobs, correct, k).mean())
        for eps in verifier_eps:
            metrics[f"verifier_eps{eps:g}@{k}"] = float(verifier_at_k(correct, k, eps).mean())
    return metrics
