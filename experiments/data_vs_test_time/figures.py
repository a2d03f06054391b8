"""Study B's figures, drawn from the numbers analyze.py computes (curves are {D: (ks, accuracy)},
seeds already averaged). Matplotlib's object API with the Agg canvas: no display needed."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

ACCURACY_LEVELS = tuple(round(0.1 * i, 1) for i in range(1, 10))


def save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=90)  # the constrained layout already fits the labels


def _no_minor_labels(ax) -> None:
    """Log axes label only the decades: minor labels (2x10^7, 3x10^7, ...) overlap."""
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def size_colors(sizes) -> dict:
    cmap = matplotlib.colormaps["viridis"]
    sizes = sorted(sizes)
    return {d: cmap(0.9 * i / max(len(sizes) - 1, 1)) for i, d in enumerate(sizes)}


def _log2_k_axis(ax, ks) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks], fontsize=7)
    ax.set_xlabel("k (samples per problem)", fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)


def panels(fig: Figure, count: int, columns: int):
    """`count` axes in rows of `columns`, plus at least one spare one (for a legend), switched off."""
    rows = -(-(count + 1) // columns)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.axis("off")
    return axes[:count], axes[count:]


def accuracy_vs_k(curves: dict[str, dict], bands: dict[str, dict], names: dict[str, str],
                  greedy: dict[int, float], label: str, path: Path) -> None:
    """One panel per strategy: accuracy vs log k, a line per D (seed mean; band: lowest to highest
    seed), greedy as a cross at k=1."""
    colors = size_colors(greedy)
    fig = Figure(figsize=(12.5, 3.6 * -(-(len(curves) + 1) // 3)), layout="constrained")
    axes, spare = panels(fig, len(curves), 3)
    for ax, (strategy, by_size) in zip(axes, curves.items()):
        for d, (ks, accuracy) in by_size.items():
            ax.plot(ks, accuracy, marker=".", color=colors[d], label=f"D={d}")
            ax.fill_between(ks, *bands[strategy][d], color=colors[d], alpha=0.15, linewidth=0)
            ax.plot([1], [greedy[d]], marker="x", color=colors[d], linestyle="none")
        _log2_k_axis(ax, ks)
        ax.set_title(names[strategy], fontsize=9)
        ax.set_ylabel("held-out accuracy", fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    spare[0].legend(handles, labels, loc="center", fontsize=8,
                    title="D (unique training problems); x: greedy")
    fig.suptitle(f"Accuracy vs samples per problem, a line per training-set size ({label})")
    save(fig, path)


def iso_accuracy(curves: dict[str, dict], slopes: dict[str, dict], names: dict[str, str],
                 path: Path) -> None:
    """Accuracy over the (log D, log k) plane with its contours; the measured contour points
    (dots) and the fitted common slope (dashed), one panel per strategy."""
    fig = Figure(figsize=(5.2 * len(curves), 4.2), layout="constrained")
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (strategy, by_size) in zip(axes, curves.items()):
        sizes = sorted(by_size)
        ks = by_size[sizes[0]][0]
        grid = np.array([by_size[d][1] for d in sizes]).T  # (k, D)
        # plotted in log coordinates, so the contours interpolate in log D and log k as the fit does
        x, y = np.meshgrid(np.log10(sizes), np.log2(ks))
        filled = ax.contourf(x, y, grid, levels=np.linspace(0, 1, 11), cmap="Greys", alpha=0.6)
        lines = ax.contour(x, y, grid, levels=ACCURACY_LEVELS, colors="tab:blue", linewidths=0.6)
        ax.clabel(lines, fontsize=6, fmt="%.1f")
        fit = slopes[strategy]["fit"]
        for level, points in slopes[strategy]["contours"].items():
            if len(points) < 2 or fit is None:
                continue
            d, k = np.log10(np.array(points, float)).T
            ax.plot(d, k / np.log10(2), "o", color="tab:red", markersize=3)
            span = np.array([d.min(), d.max()])
            ax.plot(span, (fit.intercepts[float(level)] + fit.slope * span) / np.log10(2), "--",
                    color="tab:red", linewidth=1)
        ax.set_xticks(np.log10(sizes), [str(d) for d in sizes], fontsize=7)
        ax.set_yticks(np.log2(ks), [str(k) for k in ks], fontsize=7)
        ax.set_xlabel("D (unique training problems, log scale)", fontsize=8)
        ax.set_ylabel("k (samples per problem, log scale)", fontsize=8)
        slope = "no contour with two points" if fit is None else \
            f"fitted slope d log k / d log D = {fit.slope:.2f} (R^2 {fit.r2:.2f})"
        ax.set_title(f"{names[strategy]}\n{slope}", fontsize=9)
        fig.colorbar(filled, ax=ax, label="accuracy")
    fig.suptitle("Iso-accuracy contours: red dots = measured k* per D, dashed = common-slope fit")
    save(fig, path)


def flops(pass_curves: dict, majority_curves: dict, greedy: dict, slopes: dict,
          train_flops: float, label: str, path: Path) -> None:
    """Accuracy vs inference FLOPs per problem (pass@k, majority@k), and the pass@k contours in
    the (log D, log inference FLOPs) plane."""
    colors = size_colors(greedy)
    fig = Figure(figsize=(13.5, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, curves, name in ((axes[0], pass_curves, "pass@k"), (axes[1], majority_curves,
                                                                 "majority@k")):
        for d, (flops_k, accuracy) in curves.items():
            ax.plot(flops_k, accuracy, marker=".", color=colors[d], label=f"D={d}")
            ax.plot(*greedy[d], marker="x", color=colors[d], linestyle="none")
        ax.set_xscale("log")
        _no_minor_labels(ax)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("inference FLOPs per problem (2N x tokens)", fontsize=8)
        ax.set_title(f"{name} (x: greedy)", fontsize=9)
    axes[0].set_ylabel("held-out accuracy", fontsize=8)
    axes[1].legend(fontsize=7, loc="center right")
    ax = axes[2]
    fit = slopes["flops_fit"]
    level_colors = matplotlib.colormaps["plasma"]
    for level, points in slopes["flops_contours"].items():
        if len(points) < 2:
            continue
        d, f = np.array(points, float).T
        color = level_colors(0.85 * float(level))
        ax.plot(d, f, "o-", color=color, markersize=3, label=f"accuracy {level}")
        if fit is not None:
            ax.plot(d, 10 ** (fit.intercepts[float(level)] + fit.slope * np.log10(d)), "--",
                    color=color, linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _no_minor_labels(ax)
    ax.set_xticks(sorted(greedy), [str(d) for d in sorted(greedy)], fontsize=7)
    ax.grid(True, alpha=0.3)
    ax.set_xlabel("D (unique training problems)", fontsize=8)
    ax.set_ylabel("inference FLOPs per problem", fontsize=8)
    ax.set_title("pass@k iso-accuracy in FLOPs" + ("" if fit is None else
                                                  f": slope {fit.slope:.2f}"), fontsize=9)
    ax.legend(fontsize=6)
    fig.suptitle(f"The trade-off in FLOPs ({label}); training: {train_flops:.2e} FLOPs per run, "
                 "equal for every D (fixed steps)")
    save(fig, path)


def by_difficulty(bins: dict, label: str, path: Path) -> None:
    """Rows pass@k / majority@k, a column per difficulty bin, a line per D; greedy crosses."""
    digits = list(bins["problems"])
    sizes = sorted(next(iter(bins["pass"].values())))
    colors = size_colors(sizes)
    fig = Figure(figsize=(3.2 * len(digits), 5.6), layout="constrained")
    axes = fig.subplots(2, len(digits), squeeze=False)
    for row, strategy in enumerate(("pass", "majority")):
        for col, digit in enumerate(digits):
            ax = axes[row, col]
            for d in sizes:
                ks, accuracy = bins[strategy][digit][d]
                ax.plot(ks, accuracy, marker=".", color=colors[d], label=f"D={d}")
                ax.plot([1], [bins["greedy"][digit][d]], marker="x", color=colors[d],
                        linestyle="none")
            _log2_k_axis(ax, ks)
            ax.set_title(f"{digit}-digit operands ({bins['problems'][digit]} problems): "
                         f"{strategy}@k", fontsize=8)
    axes[0, -1].legend(fontsize=6)
    fig.suptitle(f"By difficulty ({label}); x: greedy")
    save(fig, path)


def success_histogram(rates: dict[int, np.ndarray], label: str, path: Path) -> None:
    """Per D: how many problems have each share of correct samples."""
    fig = Figure(figsize=(2.6 * len(rates), 2.8), layout="constrained")
    axes = fig.subplots(1, len(rates), squeeze=False, sharey=True)[0]
    for ax, (d, rate) in zip(axes, rates.items()):
        ax.hist(rate, bins=np.linspace(0, 1, 21), color="tab:blue")
        ax.set_title(f"D={d}: never {np.mean(rate == 0):.0%}, always {np.mean(rate == 1):.0%}",
                     fontsize=8)
        ax.set_xlabel("share of correct samples", fontsize=8)
    axes[0].set_ylabel("problems (seeds pooled)", fontsize=8)
    fig.suptitle(f"Per-problem success rate ({label})")
    save(fig, path)


def settings(curves: dict[tuple[str, str], dict], labels: dict[str, str], path: Path) -> None:
    """A panel per D: pass@k (solid) and majority@k (dashed) of every sampling setting."""
    names = list(labels)
    sizes = sorted(next(iter(curves.values())))
    cmap = matplotlib.colormaps["tab10"]
    columns = min(4, len(sizes) + 1)
    fig = Figure(figsize=(3.3 * columns, 3.0 * -(-(len(sizes) + 1) // columns)), layout="constrained")
    axes, spare = panels(fig, len(sizes), columns)
    for ax, d in zip(axes, sizes):
        for i, setting in enumerate(names):
            for strategy, style in (("pass", "-"), ("majority", "--")):
                ks, accuracy = curves[(setting, strategy)][d]
                ax.plot(ks, accuracy, style, color=cmap(i), linewidth=1,
                        label=f"{labels[setting]}: {strategy}@k")
        _log2_k_axis(ax, ks)
        ax.set_title(f"D={d}", fontsize=9)
    handles, labels_ = axes[0].get_legend_handles_labels()
    spare[0].legend(handles, labels_, loc="center", fontsize=7)
    fig.suptitle("Sampling settings: pass@k (solid) and majority@k (dashed), seed means")
    save(fig, path)
