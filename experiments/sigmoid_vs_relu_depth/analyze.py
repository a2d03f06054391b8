"""Study A report: tables and plots from a sweep of `experiment=sigmoid_vs_relu_depth[_cpu]`.

    python experiments/sigmoid_vs_relu_depth/analyze.py SWEEP_DIR [--out DIR]
    python experiments/sigmoid_vs_relu_depth/analyze.py --wandb ENTITY/PROJECT/GROUP [--out DIR]

SWEEP_DIR is a Hydra multirun folder (each job: .hydra/config.yaml + metrics.jsonl, run with
trainer.diagnostics_every > 0); --wandb reads the same records from the runs of a wandb group. An
arm is (architecture, init, optimizer); seeds of a cell (arm, activation, depth) are pooled:
geometric means for gradient norms and ratios, means for losses. Writes to --out:

  runs.csv                   one row per run: ratios, final losses, steps to the loss threshold
  summary.md                 the sanity checks and markdown tables of the numbers
  grad_vs_layer_init.png     weight-gradient norm per layer at init (log), a line per depth
  act_grad_vs_layer_init.png the same for the gradient w.r.t. each layer's output
  grad_vs_layer_end.png      weight-gradient norm per layer at the last diagnostics step
  ratio_vs_depth.png         first/last-layer gradient ratio vs depth, at init and at the end
  loss_curves.png            training loss (running mean) per arm and activation, a line per depth
  final_loss_heatmap.png     final held-out loss, activation x depth, one panel per arm
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxformer.config import TaskConfig, to_dict
from jaxformer.data.tasks import build_task
from jaxformer.analysis import write_rows_csv
from jaxformer.runs import find_runs

ACTIVATION_ORDER = ("sigmoid", "relu", "gelu", "gelu_tanh", "silu")
SMOOTH = 3  # logged train losses in the running mean that decides the threshold step
SIGMOID_SLOPE_MAX = 0.25  # sigma'(x) <= 1/4


@dataclass
class Run:
    path: str
    arch: str
    activation: str
    depth: int
    init: str
    optimizer: str
    seed: int
    steps: int
    chance_loss: float  # ln(classes): the loss of a uniform guess
    train: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    evals: list[dict] = field(default_factory=list)
    diagnostics: list[dict] = field(default_factory=list)

    @property
    def arm(self) -> str:
        return f"{self.arch} / {self.init} / {self.optimizer}"


def arch_name(model: dict) -> str:
    """The conf/arch/ name of a model config (derived, so runs made without `arch=` work too)."""
    if model["kind"] == "mlp":
        return "plain_mlp"
    known = {("pre", True): "preln", ("pre", False): "noresidual", ("post", True): "postln",
             ("none", False): "plain"}
    key = (model["norm"], bool(model["residual"]))
    return f"transformer_{known.get(key, model['norm'] + ('_res' if key[1] else '_nores'))}"


def chance_loss(task: dict) -> float:
    """ln(classes): the loss of a uniform guess on a classification task (nan on other tasks)."""
    classes = build_task(TaskConfig(**task)).num_classes
    return math.log(classes) if classes else float("nan")


def make_run(path: str, config: dict, records: list[dict]) -> Run:
    model, optim = config["model"], config["optim"]
    run = Run(path, arch_name(model), model["activation"], int(model["n_layers"]), model["init"],
              optim["name"], int(config["seed"]), int(config["trainer"]["steps"]),
              chance_loss(config["task"]))
    for record in records:
        split = record.get("split")
        if split == "train":
            run.train.append((int(record["step"]), float(record["loss"])))
        elif split == "eval":
            run.evals.append(record)
        elif split == "diagnostics":
            run.diagnostics.append(record)
    return run


def load_sweep(sweep_dir: Path) -> list[Run]:
    return [make_run(str(run.path), to_dict(run.config), run.metrics())
            for run in find_runs(sweep_dir) if run.metrics_path.exists()]


def wandb_records(history_rows: list[dict]) -> list[dict]:
    """wandb history rows ({'_step', 'train/loss', 'diagnostics/grad_norm/layer_00', ...}) as
    metrics.jsonl records, one per (step, split)."""
    records = []
    for row in history_rows:
        by_split: dict[str, dict] = defaultdict(dict)
        for key, value in row.items():
            if "/" in key and value is not None:
                split, name = key.split("/", 1)
                by_split[split][name] = value
        records += [{"step": row["_step"], "split": split, **values} for split, values in by_split.items()]
    return records


def load_wandb(group_path: str) -> list[Run]:
    import wandb

    entity_project, group = group_path.rsplit("/", 1)
    runs = []
    for wb_run in wandb.Api().runs(entity_project, filters={"group": group}):
        rows = list(wb_run.scan_history())
        runs.append(make_run(wb_run.url, dict(wb_run.config), wandb_records(rows)))
    return runs


# -- per-run numbers ------------------------------------------------------------------------------
def layer_values(record: dict, stat: str) -> np.ndarray:
    """The per-layer series `stat/layer_NN` of a diagnostics record, in layer order."""
    keys = sorted(k for k in record if k.startswith(f"{stat}/layer_"))
    return np.array([record[k] for k in keys], dtype=float)


def steps_to_threshold(run: Run, threshold: float) -> int | None:
    """First logged step where the running mean of SMOOTH train losses is at most `threshold`."""
    losses = [loss for _, loss in run.train]
    for i in range(SMOOTH - 1, len(losses)):
        if np.mean(losses[i - SMOOTH + 1 : i + 1]) <= threshold:
            return run.train[i][0]
    return None


def _largest(record: dict, stat: str) -> float:
    """The largest per-layer value of `stat` in a diagnostics record."""
    values = layer_values(record, stat)
    return float(values.max()) if len(values) else float("nan")


def summarize(run: Run, fraction: float) -> dict:
    first, last = (run.diagnostics[0], run.diagnostics[-1]) if run.diagnostics else ({}, {})
    final_eval = run.evals[-1] if run.evals else {}
    threshold = fraction * run.chance_loss
    reached = steps_to_threshold(run, threshold)
    diverged = any(not math.isfinite(loss) for _, loss in run.train)
    return {
        "arch": run.arch, "init": run.init, "optimizer": run.optimizer,
        "activation": run.activation, "depth": run.depth, "seed": run.seed,
        "ratio_init": first.get("grad_ratio", float("nan")),
        "act_ratio_init": first.get("act_grad_ratio", float("nan")),
        "ratio_end": last.get("grad_ratio", float("nan")),
        "end_step": last.get("step", 0),
        "saturated_end": _largest(last, "saturated_frac"),
        "dead_end": _largest(last, "dead_frac"),
        "final_train_loss": float(np.mean([l for _, l in run.train[-SMOOTH:]])) if run.train else float("nan"),
        "final_eval_loss": final_eval.get("loss", float("nan")),
        "final_accuracy": final_eval.get("accuracy", float("nan")),
        "threshold": threshold,
        "fraction": fraction,
        "steps_to_threshold": reached if reached is not None else run.steps,
        "censored": reached is None,
        "diverged": diverged,
        "path": run.path,
    }


# -- pooling seeds --------------------------------------------------------------------------------
def mean(values) -> float:
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def geomean(values) -> float:
    values = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if not len(values):
        return float("nan")
    if (values <= 0).any():
        return 0.0 if (values == 0).any() else float("nan")
    return float(np.exp(np.log(values).mean()))


def cells(rows: list[dict]) -> dict[tuple, list[dict]]:
    """(arm, activation, depth) -> the rows of its seeds."""
    grouped = defaultdict(list)
    for row in rows:
        grouped[(arm_of(row), row["activation"], row["depth"])].append(row)
    return grouped


def arm_of(row: dict) -> str:
    return f"{row['arch']} / {row['init']} / {row['optimizer']}"


def ordered(values, order=ACTIVATION_ORDER):
    return sorted(set(values), key=lambda v: (order.index(v) if v in order else len(order), v))


# -- figures --------------------------------------------------------------------------------------
def save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=90, bbox_inches="tight")


def depth_colors(depths):
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return {d: cmap(i / max(len(depths) - 1, 1)) for i, d in enumerate(depths)}


def plot_per_layer(runs: list[Run], stat: str, when: str, by_optimizer: bool, path: Path) -> None:
    """Panels: rows = arms (init only, or init + optimizer), columns = activations; a line per
    depth of the per-layer `stat` (geometric mean over seeds) at the first or last diagnostics."""
    groups = defaultdict(list)
    for run in runs:
        if run.diagnostics:
            row = f"{run.arch} / {run.init}" + (f" / {run.optimizer}" if by_optimizer else "")
            groups[(row, run.activation, run.depth)].append(run)
    rows = sorted({key[0] for key in groups})
    acts = ordered(key[1] for key in groups)
    depths = sorted({key[2] for key in groups})
    colors = depth_colors(depths)
    fig = Figure(figsize=(4.2 * len(acts), 3.0 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), len(acts), squeeze=False)
    for (row, act, depth), members in sorted(groups.items()):
        if not by_optimizer:  # at init the optimizer plays no part: one run per seed is enough
            members = list({run.seed: run for run in members}.values())
        index = 0 if when == "init" else -1
        series = np.array([layer_values(run.diagnostics[index], stat) for run in members])
        curve = np.exp(np.log(np.where(series > 0, series, np.nan)).mean(axis=0))
        ax = axes[rows.index(row), acts.index(act)]
        ax.plot(np.arange(1, len(curve) + 1), curve, marker=".", color=colors[depth], label=f"depth {depth}")
    for r, row in enumerate(rows):
        for c, act in enumerate(acts):
            ax = axes[r, c]
            ax.set_yscale("log")
            ax.set_title(f"{row} / {act}", fontsize=9)
            ax.set_xlabel("layer (1 = nearest the input)", fontsize=8)
            ax.grid(True, which="major", alpha=0.3)
        axes[r, 0].set_ylabel(stat.replace("_", " "), fontsize=8)
    axes[0, -1].legend(fontsize=7)
    fig.suptitle(f"{stat} per layer at {'initialisation (step 0)' if when == 'init' else 'the last diagnostics step'}")
    save(fig, path)


def plot_ratio_vs_depth(rows: list[dict], path: Path) -> None:
    """Columns: (architecture, init); rows: at init, at the last diagnostics step; a line per
    activation (and optimizer, at the end), geometric mean over seeds."""
    arches = sorted({(r["arch"], r["init"]) for r in rows})
    grouped = cells(rows)
    depths = sorted({r["depth"] for r in rows})
    acts = ordered(r["activation"] for r in rows)
    optimizers = sorted({r["optimizer"] for r in rows})
    fig = Figure(figsize=(4.2 * len(arches), 6.4), layout="constrained")
    axes = fig.subplots(2, len(arches), squeeze=False)
    for c, (arch, init) in enumerate(arches):
        for r, (column, when) in enumerate((("ratio_init", "at init"), ("ratio_end", "at the end"))):
            ax = axes[r, c]
            # at init the optimizer plays no part: the first one's runs stand for all
            for optimizer in optimizers[:1] if column == "ratio_init" else optimizers:
                for act in acts:
                    arm = f"{arch} / {init} / {optimizer}"
                    points = [(d, geomean(x[column] for x in grouped[(arm, act, d)]))
                              for d in depths if (arm, act, d) in grouped]
                    if points:
                        ax.plot(*zip(*points), "-" if optimizer == optimizers[0] else "--", marker="o",
                                label=act if column == "ratio_init" else f"{act} ({optimizer})")
            if column == "ratio_init" and arch == "plain_mlp":
                ax.plot(depths, [SIGMOID_SLOPE_MAX ** (d - 1) for d in depths], ":", color="grey",
                        label="0.25^(depth-1)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.axhline(1.0, color="black", lw=0.5)
            ax.set_title(f"{arch} / {init}, {when}", fontsize=9)
            ax.set_xlabel("depth (layers)", fontsize=8)
            ax.legend(fontsize=6)
    fig.suptitle("first/last-layer weight-gradient norm ratio vs depth")
    save(fig, path)


def plot_loss_curves(runs: list[Run], path: Path) -> None:
    groups = defaultdict(list)
    for run in runs:
        groups[(run.arm, run.activation, run.depth)].append(run)
    arms = sorted({key[0] for key in groups})
    acts = ordered(key[1] for key in groups)
    colors = depth_colors(sorted({key[2] for key in groups}))
    fig = Figure(figsize=(4.2 * len(acts), 2.8 * len(arms)), layout="constrained")
    axes = fig.subplots(len(arms), len(acts), squeeze=False)
    for (arm, act, depth), members in sorted(groups.items()):
        n = min(len(run.train) for run in members)  # a diverged seed stops early
        steps = [s for s, _ in members[0].train[:n]]
        losses = np.mean([[l for _, l in run.train[:n]] for run in members], axis=0)
        smooth = np.convolve(losses, np.ones(SMOOTH) / SMOOTH, mode="valid")
        ax = axes[arms.index(arm), acts.index(act)]
        ax.plot(steps[SMOOTH - 1 :], smooth, color=colors[depth], label=f"depth {depth}")
        ax.axhline(members[0].chance_loss, color="grey", ls=":", lw=0.8)
    for r, arm in enumerate(arms):
        for c, act in enumerate(acts):
            axes[r, c].set_title(f"{arm} / {act}", fontsize=9)
            axes[r, c].set_xlabel("step", fontsize=8)
        axes[r, 0].set_ylabel("train loss", fontsize=8)
    axes[0, -1].legend(fontsize=7)
    fig.suptitle("training loss (running mean of 3 logs; dotted: chance, ln classes)")
    save(fig, path)


def plot_heatmaps(rows: list[dict], path: Path) -> None:
    grouped = cells(rows)
    arms = sorted({key[0] for key in grouped})
    acts = ordered(key[1] for key in grouped)
    depths = sorted({key[2] for key in grouped})
    n_cols = min(len(arms), 3)
    fig = Figure(figsize=(4.6 * n_cols, 2.6 * math.ceil(len(arms) / 3)), layout="constrained")
    axes = fig.subplots(math.ceil(len(arms) / n_cols), n_cols, squeeze=False).ravel()
    for ax, arm in zip(axes, arms):
        grid = np.array([[mean([x["final_eval_loss"] for x in grouped.get((arm, a, d), [])])
                          for d in depths] for a in acts])
        chance = next(x["threshold"] / x["fraction"] for x in rows if arm_of(x) == arm)
        # one colour scale for every panel: the loss as a share of the chance loss
        image = ax.imshow(grid / chance, cmap="magma_r", aspect="auto", vmin=0.0, vmax=1.0)
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if value / chance > 0.55 else "black")
        ax.set_xticks(range(len(depths)), [str(d) for d in depths], fontsize=7)
        ax.set_yticks(range(len(acts)), acts, fontsize=7)
        ax.set_xlabel("depth", fontsize=8)
        ax.set_title(arm, fontsize=8)
        fig.colorbar(image, ax=ax, shrink=0.8)
    for ax in axes[len(arms):]:
        ax.axis("off")
    fig.suptitle("final held-out loss (colour: share of the chance loss ln classes)")
    save(fig, path)


# -- tables ---------------------------------------------------------------------------------------
def fit_geometric(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(per-layer factor, R^2) of a log-linear fit ratio ~ factor^(depth - 1)."""
    depths = np.array([d for d, _ in points], float) - 1
    logs = np.log10([r for _, r in points])
    slope, intercept = np.polyfit(depths, logs, 1)
    residual = logs - (slope * depths + intercept)
    r2 = 1 - residual.var() / logs.var() if logs.var() > 0 else 1.0
    return float(10**slope), float(r2)


def sanity_checks(rows: list[dict]) -> list[str]:
    """The two checks the study promises, judged on the plain MLP at init."""
    at_init = defaultdict(list)  # optimizers and seeds pooled: at init they see the same weights
    for row in rows:
        if row["arch"] == "plain_mlp":
            at_init[(row["activation"], row["init"], row["depth"])].append(row["ratio_init"])
    lines = []
    for init in sorted({key[1] for key in at_init if key[0] == "sigmoid"}):
        points = sorted((d, geomean(v)) for (a, i, d), v in at_init.items() if (a, i) == ("sigmoid", init))
        if len(points) < 2 or not all(r > 0 for _, r in points):
            continue
        factor, r2 = fit_geometric(points)
        falling = all(b[1] < a[1] for a, b in zip(points, points[1:]))
        verdict = "PASS" if falling and factor < 0.5 and r2 > 0.9 else "FAIL"
        values = ", ".join(f"{d}: {r:.2g}" for d, r in points)
        lines.append(f"- {verdict}: plain MLP, sigmoid, {init} init, first/last gradient ratio at init "
                     f"falls geometrically with depth ({values}); fitted factor per layer {factor:.3f} "
                     f"(R^2 {r2:.3f}; sigma' <= 0.25)")
    points = sorted((d, geomean(v)) for (a, i, d), v in at_init.items() if (a, i) == ("relu", "he"))
    if points:
        verdict = "PASS" if all(0.1 <= r <= 10 for _, r in points) else "FAIL"
        values = ", ".join(f"{d}: {r:.2g}" for d, r in points)
        lines.append(f"- {verdict}: plain MLP, relu, he init, first/last gradient ratio at init stays "
                     f"within 10x of 1 ({values})")
    return lines


def pivot(rows: list[dict], column: str, fmt, by_arm: bool = True) -> str:
    """Markdown table: a line per (arm or architecture/init, activation), a column per depth."""
    grouped = defaultdict(list)
    for row in rows:
        name = arm_of(row) if by_arm else f"{row['arch']} / {row['init']}"
        grouped[(name, row["activation"], row["depth"])].append(row)
    depths = sorted({key[2] for key in grouped})
    names = sorted({key[0] for key in grouped})
    lines = ["| " + ("arm" if by_arm else "architecture / init") + " | activation | "
             + " | ".join(f"depth {d}" for d in depths) + " |",
             "|---|---|" + "---|" * len(depths)]
    for name in names:
        for act in ordered(key[1] for key in grouped if key[0] == name):
            cells_ = [fmt(grouped[(name, act, d)]) if (name, act, d) in grouped else "" for d in depths]
            lines.append(f"| {name} | {act} | " + " | ".join(cells_) + " |")
    return "\n".join(lines)


def ratio_cell(column: str):
    def cell(members: list[dict]) -> str:
        if all(math.isnan(m[column]) for m in members):
            return "0/0"  # no gradient reached the first or the last layer (e.g. dead relu units)
        return f"{geomean(m[column] for m in members):.2g}"
    return cell


def mean_cell(column: str, fmt: str = ".3f"):
    return lambda members: f"{mean(m[column] for m in members):{fmt}}"


def threshold_cell(members: list[dict]) -> str:
    """Median steps over seeds; '>N' when most seeds never reached the threshold (censored)."""
    if sum(m["censored"] for m in members) * 2 > len(members):
        return f">{members[0]['steps_to_threshold']}"
    return f"{int(np.median([m['steps_to_threshold'] for m in members if not m['censored']]))}"


def write_summary(rows: list[dict], source: str, fraction: float, path: Path) -> None:
    diverged = [r for r in rows if r["diverged"]]
    text = [
        "# Study A: sigmoid vs ReLU as depth grows (generated by analyze.py)", "",
        f"{len(rows)} runs from `{source}`; seeds pooled (geometric means for ratios, means for "
        "losses). Ratios are the gradient norm of the first layer over that of the last "
        "(weight gradients unless marked); 'at init' is step 0, 'at the end' the last diagnostics "
        f"step. The loss threshold is {fraction:g} x ln(classes), reached when the running mean of "
        f"{SMOOTH} logged training losses falls to it; '>N': never within the N steps (censored).",
        "", "## Sanity checks", "", *(sanity_checks(rows) or ["- (no plain-MLP runs)"]),
        "", f"Diverged runs (non-finite loss): {len(diverged)}",
        "", "## First/last weight-gradient ratio at init", "",
        pivot(rows, "ratio_init", ratio_cell("ratio_init"), by_arm=False),
        "", "## First/last activation-gradient ratio at init (gradient w.r.t. layer outputs)", "",
        pivot(rows, "act_ratio_init", ratio_cell("act_ratio_init"), by_arm=False),
        "", "## First/last weight-gradient ratio at the end of training", "",
        pivot(rows, "ratio_end", ratio_cell("ratio_end")),
        "", "## Final held-out loss", "", pivot(rows, "final_eval_loss", mean_cell("final_eval_loss")),
        "", "## Largest saturated share of any layer's activations at the end "
        "(sigmoid: outputs outside [0.01, 0.99]; relu: zeros; gelu: slope below 0.01)", "",
        pivot(rows, "saturated_end", mean_cell("saturated_end", ".2f")),
        "", "## Largest dead-unit share of any layer at the end (zero for the whole batch)", "",
        pivot(rows, "dead_end", mean_cell("dead_end", ".2f")),
        "", "## Steps to the loss threshold", "", pivot(rows, "steps_to_threshold", threshold_cell), "",
    ]
    path.write_text("\n".join(text))


CSV_COLUMNS = ("arch", "init", "optimizer", "activation", "depth", "seed", "ratio_init",
               "act_ratio_init", "ratio_end", "end_step", "saturated_end", "dead_end",
               "final_train_loss", "final_eval_loss",
               "final_accuracy", "threshold", "steps_to_threshold", "censored", "diverged", "path")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", nargs="?", help="a Hydra multirun folder")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT/GROUP", help="read a wandb group instead")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--threshold-fraction", type=float, default=0.5,
                        help="loss threshold as a fraction of the chance loss ln(classes)")
    args = parser.parse_args(argv)
    if bool(args.sweep_dir) == bool(args.wandb):
        parser.error("give a sweep dir or --wandb ENTITY/PROJECT/GROUP (one of them)")
    source = args.wandb or args.sweep_dir
    runs = load_wandb(args.wandb) if args.wandb else load_sweep(Path(args.sweep_dir))
    runs = [run for run in runs if run.diagnostics]
    if not runs:
        raise SystemExit(f"error: no runs with diagnostics in {source}: sweep with "
                         "trainer.diagnostics_every > 0 (the study's experiments do)")
    rows = [summarize(run, args.threshold_fraction) for run in runs]
    rank = {act: i for i, act in enumerate(ordered(r["activation"] for r in rows))}
    rows.sort(key=lambda r: (r["arch"], r["init"], r["optimizer"], rank[r["activation"]],
                             r["depth"], r["seed"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_rows_csv(out / "runs.csv", CSV_COLUMNS, rows)
    write_summary(rows, source, args.threshold_fraction, out / "summary.md")
    plot_per_layer(runs, "grad_norm", "init", False, out / "grad_vs_layer_init.png")
    plot_per_layer(runs, "act_grad_norm", "init", False, out / "act_grad_vs_layer_init.png")
    plot_per_layer(runs, "grad_norm", "end", True, out / "grad_vs_layer_end.png")
    plot_ratio_vs_depth(rows, out / "ratio_vs_depth.png")
    plot_loss_curves(runs, out / "loss_curves.png")
    plot_heatmaps(rows, out / "final_loss_heatmap.png")
    print(f"{len(rows)} runs -> {out}")
    print("\n".join(sanity_checks(rows)))


if __name__ == "__main__":
    main()
