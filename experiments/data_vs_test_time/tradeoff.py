"""Study B's arithmetic: FLOPs of training and of sampling, the k at which an accuracy curve reaches
a target, iso-accuracy contours in the (log D, log k) plane and their common slope.

A contour at accuracy a joins the points (D, k*(D, a)) where a model trained on D unique problems
reaches a with k samples. Its slope beta = d log k / d log D says what data is worth in samples:
multiplying D by f saves a factor f ** -beta in k at equal accuracy (beta < 0 when both help).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

JONES_TEST_PER_10X_TRAIN = 15.0  # Jones 2021: 10x training compute saves ~15x test-time compute


def train_flops(n_params: int, tokens: float) -> float:
    """About 6 N per training token: forward (2N) + backward (4N), attention's own FLOPs left out."""
    return 6.0 * n_params * tokens


def sample_flops(n_params: int, prompt_tokens: float, sample_tokens: float, k: float) -> float:
    """About 2 N per token processed to answer one problem with k samples: the prompt once (the k
    samples share its KV cache) and every token of each sample (<eos> included)."""
    return 2.0 * n_params * (prompt_tokens + k * sample_tokens)


def k_to_reach(ks, accuracy, target: float) -> float | None:
    """The k at which the curve (accuracy at ks, ks rising) first reaches `target`, linear in log k
    between measured points; ks[0] if it starts there, None if it never gets there."""
    ks, accuracy = np.asarray(ks, float), np.asarray(accuracy, float)
    if accuracy[0] >= target:
        return float(ks[0])
    for i in range(1, len(ks)):
        if accuracy[i] >= target:
            t = (target - accuracy[i - 1]) / (accuracy[i] - accuracy[i - 1])
            return float(np.exp(np.log(ks[i - 1]) + t * (np.log(ks[i]) - np.log(ks[i - 1]))))
    return None


def iso_accuracy(curves: dict[int, tuple], targets) -> dict[float, list[tuple[int, float]]]:
    """{target: [(D, k*), ...]} from {D: (ks, accuracy)}: only the D whose curve starts below the
    target and reaches it, so k* is measured, not censored at the ends of the k range."""
    contours = {}
    for target in targets:
        points = []
        for d, (ks, accuracy) in sorted(curves.items()):
            k = k_to_reach(ks, accuracy, target)
            if k is not None and accuracy[0] < target:
                points.append((d, k))
        contours[float(target)] = points
    return contours


@dataclass
class SlopeFit:
    slope: float  # d log k / d log D, common to every contour
    intercepts: dict[float, float]  # log10 k at D = 1, per contour
    r2: float  # share of the within-contour variance of log k that the slope explains
    points: int  # (D, k*) points in the fit
    contours: int  # contours with at least two points

    def k_factor(self, data_factor: float) -> float:
        """How many times more samples buy what `data_factor` times more data buys."""
        return data_factor ** -self.slope


def fit_common_slope(contours: dict[float, list[tuple[int, float]]],
                     min_points: int = 3) -> SlopeFit | None:
    """Least squares log10 k = intercept(contour) + slope * log10 D over every contour with two or
    more points (one slope, one intercept each); None with fewer than `min_points` such points
    (two points always fit exactly: no evidence of a slope)."""
    groups = {a: np.log10(np.asarray(p, float)) for a, p in contours.items() if len(p) >= 2}
    if sum(len(logs) for logs in groups.values()) < min_points:
        return None
    sxy = sxx = syy = 0.0
    means = {}
    for a, logs in groups.items():
        x, y = logs[:, 0], logs[:, 1]
        means[a] = (x.mean(), y.mean())
        sxy += float(((x - x.mean()) * (y - y.mean())).sum())
        sxx += float(((x - x.mean()) ** 2).sum())
        syy += float(((y - y.mean()) ** 2).sum())
    if sxx == 0.0:
        return None
    slope = sxy / sxx
    r2 = 1.0 - (syy - slope * sxy) / syy if syy > 0 else 1.0
    intercepts = {a: my - slope * mx for a, (mx, my) in means.items()}
    return SlopeFit(slope, intercepts, r2, sum(len(v) for v in groups.values()), len(groups))


def local_slopes(contours: dict[float, list[tuple[int, float]]]) -> list[tuple[float, int, int, float]]:
    """(accuracy, D1, D2, d log k / d log D) between neighbouring points of each contour: where
    the common slope hides a trend, these show it."""
    return [(a, d1, d2, float(np.log(k2 / k1) / np.log(d2 / d1)))
            for a, points in contours.items() for (d1, k1), (d2, k2) in zip(points, points[1:])]


def extrapolate_k(ks, accuracy, target: float, last: int = 4, max_factor: int = 64) -> float | None:
    """Past the measured k: where the straight line in log k through the curve's `last` points
    reaches `target`; None if that line does not rise or needs over max_factor x the largest k."""
    gain, _ = log_linear_fit(ks[-last:], accuracy[-last:])
    if gain <= 0:
        return None
    k = ks[-1] * 2.0 ** ((target - accuracy[-1]) / gain)
    return float(k) if k <= max_factor * ks[-1] else None


def log_linear_fit(ks, accuracy) -> tuple[float, float]:
    """(gain per doubling of k, R^2) of accuracy = a + b log2 k: Brown et al. (2024) find coverage
    close to log-linear in k over orders of magnitude."""
    x, y = np.log2(np.asarray(ks, float)), np.asarray(accuracy, float)
    b, a = np.polyfit(x, y, 1)
    residual = float(((y - (a + b * x)) ** 2).sum())
    total = float(((y - y.mean()) ** 2).sum())
    return float(b), (1.0 - residual / total) if total > 0 else math.nan
