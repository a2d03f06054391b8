"""Selection strategies over n samples: each estimator against a brute-force enumeration of the
k-subsets (and of the verifier's accept / reject outcomes) on small cases."""

from __future__ import annotations

from itertools import combinations, product
from math import comb

import numpy as np
import pytest

from jaxformer.inference.selection import (
    answer_ids, best_logprob_at_k, ks_up_to, majority_at_k, pass_at_k, selection_metrics,
    verifier_at_k,
)

# one problem per row: 6 samples each, answer texts, correctness, log-probabilities
ANSWERS = [["12", "12", "13", "9", "12", "13"],
           ["a", "b", "c", "d", "e", "f"],
           ["x", "y", "x", "y", "z", "z"],
           ["7", "7", "7", "7", "7", "7"]]
CORRECT = np.asarray([[1, 1, 0, 0, 1, 0], [0, 0, 1, 0, 0, 0], [0, 1, 0, 1, 0, 0],
                      [0, 0, 0, 0, 0, 0]], bool)
LOGPROBS = np.asarray([[-1.0, -2.0, -0.5, -3.0, -1.5, -0.7], [-4.0, -1.0, -2.0, -0.1, -3.0, -2.5],
                       [-1.0, -1.2, -0.9, -2.0, -0.3, -0.4], [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]])
N = 6


def subsets(k: int):
    return list(combinations(range(N), k))


@pytest.mark.parametrize("n, c, k", [(10, 0, 3), (10, 3, 1), (10, 3, 5), (10, 8, 3), (5, 5, 5),
                                     (20, 1, 20), (7, 2, 6)])
def test_pass_at_k_is_the_combinatorial_formula(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_k_is_vectorised_and_stable_for_large_n():
    n, c = np.asarray([200, 200, 1000, 100]), np.asarray([0, 1, 999, 100])
    out = pass_at_k(n, c, 100)
    np.testing.assert_allclose(out, [0.0, 0.5, 1.0, 1.0], atol=1e-12)  # C(1000, 100) overflows floats
    np.testing.assert_allclose(pass_at_k(N, CORRECT.sum(1), 1), CORRECT.mean(1))
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 2, 5)


@pytest.mark.parametrize("k", range(1, N + 1))
def test_best_logprob_at_k_is_exact(k):
    brute = [np.mean([CORRECT[p, max(s, key=lambda i: LOGPROBS[p, i])] for s in subsets(k)])
             for p in range(len(ANSWERS))]
    np.testing.assert_allclose(best_logprob_at_k(LOGPROBS, CORRECT, k), brute, atol=1e-12)


@pytest.mark.parametrize("k, eps", [(1, 0.3), (2, 0.0), (3, 0.1), (4, 0.5), (6, 0.05), (3, 1.0)])
def test_verifier_at_k_is_exact(k, eps):
    """Enumerate subsets and which wrong samples the verifier accepts; pick uniformly among the
    accepted, else the highest log-prob sample."""
    expected = []
    for p in range(len(ANSWERS)):
        total = 0.0
        for subset in subsets(k):
            wrong = [i for i in subset if not CORRECT[p, i]]
            for accepted_wrong in product([False, True], repeat=len(wrong)):
                chance = np.prod([eps if a else 1 - eps for a in accepted_wrong])
                accepted = [i for i in subset if CORRECT[p, i]] + \
                    [i for i, a in zip(wrong, accepted_wrong) if a]
                if accepted:
                    success = np.mean([CORRECT[p, i] for i in accepted])
                else:
                    success = CORRECT[p, max(subset, key=lambda i: LOGPROBS[p, i])]
                total += chance * success
        expected.append(total / comb(N, k))
    np.testing.assert_allclose(verifier_at_k(CORRECT, k, eps), expected, atol=1e-12)


def test_verifier_limits_are_pass_at_k_and_a_uniform_pick():
    for k in (1, 3, 6):
        np.testing.assert_allclose(verifier_at_k(CORRECT, k, 0.0), pass_at_k(N, CORRECT.sum(1), k))
        np.testing.assert_allclose(verifier_at_k(CORRECT, k, 1.0), CORRECT.mean(1))


@pytest.mark.parametrize("k", [1, 2, 3, 5, 6])
def test_majority_at_k_matches_the_exact_expectation(k):
    """Exact: over all k-subsets, the share of the tied winners that are correct."""
    ids = answer_ids(ANSWERS)
    expected = []
    for p in range(len(ANSWERS)):
        total = 0.0
        for subset in subsets(k):
            votes = np.bincount(ids[p, list(subset)], minlength=N)
            winners = np.flatnonzero(votes == votes.max())
            answer_correct = {ids[p, i]: CORRECT[p, i] for i in range(N)}
            total += np.mean([answer_correct[w] for w in winners])
        expected.append(total / comb(N, k))
    estimate = majority_at_k(ids, CORRECT, k, resamples=4000, rng=np.random.default_rng(0))
    np.testing.assert_allclose(estimate, expected, atol=0.03)  # Monte Carlo sd <= 0.008


def test_answer_ids_group_equal_texts_per_problem():
    ids = answer_ids(ANSWERS)
    assert ids.shape == (4, N)
    assert ids[0, 0] == ids[0, 1] == ids[0, 4] != ids[0, 2] == ids[0, 5]
    assert len(set(ids[1])) == N and len(set(ids[3])) == 1


def test_selection_metrics_cover_every_k_and_strategy():
    assert ks_up_to(8) == [1, 2, 4, 8] and ks_up_to(6) == [1, 2, 4, 6] and ks_up_to(1) == [1]
    metrics = selection_metrics(CORRECT, LOGPROBS, ANSWERS, [0.0, 0.1], resamples=200, seed=0)
    assert metrics["sample_accuracy"] == pytest.approx(CORRECT.mean())
    assert metrics["pass@1"] == pytest.approx(CORRECT.mean())
    for k in (1, 2, 4, 6):
        assert {f"pass@{k}", f"majority@{k}", f"best_logprob@{k}", f"verifier_eps0@{k}",
                f"verifier_eps0.1@{k}"} <= set(metrics)
        assert metrics[f"verifier_eps0@{k}"] == pytest.approx(metrics[f"pass@{k}"])
    assert metrics == selection_metrics(CORRECT, LOGPROBS, ANSWERS, [0.0, 0.1], 200, seed=0)
