"""The comparison's plot (jaxformer/analysis/compare.py): one metric against step, tokens and
FLOPs (6 x params x tokens), a line per group (the mean over its seeds at each step) and a band
from its lowest to its highest seed. matplotlib's Agg canvas: no display needed."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from jaxformer.analysis.compare import Comparison, Group

X_AXES = ("step", "tokens", "FLOPs (6 × params × tokens)")


def seed_band(group: Group, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                   np.ndarray] | None:
    """steps, and at each the mean, lowest and highest value over the group's runs that
    recorded it; None when none did."""
    curves = [dict(row.curves[metric]) for row in group.rows if row.curves.get(metric)]
    if not curves:
        return None
    steps = sorted({step for curve in curves for step in curve})
    values = [np.array([curve[step] for curve in curves if step in curve]) for step in steps]
    return (np.array(steps), np.array([v.mean() for v in values]),
            np.array([v.min() for v in values]), np.array([v.max() for v in values]))


def x_scales(group: Group) -> tuple[float | None, float | None, float | None]:
    """What one step is worth on each x axis: 1 step, tokens per step, FLOPs per step (None:
    unknown for this group)."""
    tokens = next((row.tokens_per_step for row in group.rows if row.tokens_per_step), None)
    params = next((row.params for row in group.rows if row.params), None)
    return 1.0, tokens, (6.0 * params * tokens if tokens and params else None)


def plot_metric(comparison: Comparison, path: Path) -> Path:
    metric = comparison.metric
    figure = Figure(figsize=(16, 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(X_AXES), sharey=True)
    for group in comparison.groups:
        band = seed_band(group, metric)
        if band is None:
            continue
        steps, mean, low, high = band
        label = f"{group.label(comparison.by)} (n={len(group.rows)})"
        for ax, scale in zip(axes, x_scales(group)):
            if scale is None:
                continue
            x = steps * scale
            (line,) = ax.plot(x, mean, marker="o", markersize=3, label=label)
            if len(group.rows) > 1:
                ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    for ax, name in zip(axes, X_AXES):
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    axes[0].legend(fontsize="small")
    figure.suptitle(f"{metric}: mean over seeds, band from the lowest to the highest seed")
    figure.savefig(path, dpi=110)
    return path
