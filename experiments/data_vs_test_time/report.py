"""Study B's written report: the markdown tables of summary.md, runs.csv, curves.csv and
tradeoff.json, from the numbers analyze.py computes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from sweep import STRATEGIES, Run, inference_flops, mean_curves, mean_over
from tradeoff import JONES_TEST_PER_10X_TRAIN, local_slopes, log_linear_fit


# -- tables ---------------------------------------------------------------------------------------
def fmt(value, spec: str = ".3f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def fmt_k(k: float | None, max_k: int) -> str:
    if k is None:
        return f"> {max_k}"
    return "1 (already)" if k <= 1 else f"{k:.3g}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def accuracy_tables(groups, setting: str) -> list[str]:
    ks = next(iter(groups.values()))[0].evaluations[setting].ks
    out = []
    for strategy, name in STRATEGIES.items():
        curves = mean_curves(groups, setting, strategy)
        rows = [[str(d), fmt(mean_over(m, lambda r: r.evaluations[setting].summary[
            "greedy_accuracy"])), *(fmt(a) for a in curves[d][1])] for d, m in groups.items()]
        out += [f"### {name}", "", table(["D", "greedy", *(f"k={k}" for k in ks)], rows), ""]
    return out


def settings_table(groups, settings: list[str], any_run: Run) -> str:
    rows = []
    for setting in settings:
        n = any_run.evaluations[setting].ks[-1]
        cells = [f"{mean_over(m, lambda r: r.evaluations[setting].summary['pass@1']):.2f} / "
                 f"{mean_over(m, lambda r: r.evaluations[setting].summary[f'pass@{n}']):.2f} / "
                 f"{mean_over(m, lambda r: r.evaluations[setting].summary[f'majority@{n}']):.2f}"
                 for m in groups.values()]
        rows.append([f"{any_run.evaluations[setting].label} (n={n})", *cells])
    return table(["setting: pass@1 / pass@n / majority@n", *(f"D={d}" for d in groups)], rows)


def slope_table(slopes: dict) -> str:
    rows = []
    for strategy, s in slopes.items():
        per_seed = ", ".join(f"{fmt(v, '.2f')}" for v in s["slope_per_seed"].values())
        rows.append([STRATEGIES[strategy], fmt(s["slope"], ".2f"), fmt(s["r2"], ".2f"),
                     f"{s['points']} ({s['contours_fitted']})", fmt(s["k_for_2x_data"], ".3g"),
                     fmt(s["k_for_10x_data"], ".3g"), fmt(s["flops_slope"], ".2f"), per_seed])
    return table(["strategy", "slope d log k / d log D", "R^2", "points (contours)",
                  "k worth 2x data", "k worth 10x data", "slope in inference FLOPs",
                  "slope per seed"], rows)


def contour_table(groups, slopes: dict, strategy: str) -> str:
    contours = slopes[strategy]["contours"]
    rows = []
    for target, points in contours.items():
        found = dict(points)
        rows.append([target, *(fmt(found.get(d), ".3g") for d in groups)])
    return table(["accuracy", *(f"k* at D={d}" for d in groups)], rows)


def local_slope_table(slopes: dict) -> str:
    rows = []
    for strategy in ("pass", "verifier_eps0.05"):
        contours = {float(a): p for a, p in slopes[strategy]["contours"].items()}
        rows += [[STRATEGIES[strategy], f"{a:g}", f"{d1} -> {d2}", f"{s:.2f}",
                  f"{(d2 / d1) ** -s:.3g}"] for a, d1, d2, s in local_slopes(contours)]
    return table(["strategy", "accuracy", "D", "local slope", "k worth the step in D"], rows)


def matching_rows(matches: list[dict]) -> str:
    rows = []
    for m in matches:
        extra = m["extra_flops"]
        guess = m["pass_extrapolated"]
        rows.append([f"{m['factor']}x: D={m['D']} vs {m['D_big']}", m["reference"],
                     f"{m['target']:.3f}", *(fmt_k(m[s], m["max_k"]) for s in STRATEGIES),
                     "" if m["pass"] is not None else fmt(guess, ".3g", f"> {64 * m['max_k']}"),
                     fmt(extra, ".2e"), fmt(m["train_flops"] / extra if extra else None, ".3g")])
    return table(["data", "bigger D's", "accuracy", *STRATEGIES.values(),
                  "pass@k extrapolated", "extra inference FLOPs / problem (pass)",
                  "problems until = training FLOPs"], rows)


def flops_table(groups, setting: str) -> str:
    rows = []
    for d, members in groups.items():
        n = members[0].evaluations[setting].ks[-1]
        rows.append([str(d), f"{members[0].n_params:,}", f"{members[0].train_tokens:,}",
                     f"{members[0].train_flops:.2e}",
                     f"{inference_flops(members, setting, 1, greedy=True):.2e}",
                     f"{inference_flops(members, setting, 1):.2e}",
                     f"{inference_flops(members, setting, n):.2e}",
                     f"{mean_over(members, lambda r: r.evaluations[setting].sample_tokens):.2f}"])
    return table(["D", "parameters N", "training tokens", "training FLOPs (6NT)",
                  "greedy FLOPs / problem", "k=1 FLOPs / problem", "k=n FLOPs / problem",
                  "tokens / sample"], rows)


def difficulty_table(bins: dict, groups) -> str:
    rows = []
    for digits, count in bins["problems"].items():
        cells = []
        for d in groups:
            ks, pass_k = bins["pass"][digits][d]
            cells.append(f"{bins['greedy'][digits][d]:.2f} / {pass_k[-1]:.2f} / "
                         f"{bins['majority'][digits][d][1][-1]:.2f}")
        rows.append([str(digits), str(count), *cells])
    return table(["digits", "problems", *(f"D={d}: greedy / pass@n / maj@n" for d in groups)], rows)


def success_table(rates: dict[int, np.ndarray]) -> str:
    rows = [[str(d), f"{np.mean(r == 0):.2f}", f"{np.mean((r > 0) & (r < 1)):.2f}",
             f"{np.mean(r == 1):.2f}", f"{np.mean((r > 0) & (r < 0.1)):.2f}"]
            for d, r in rates.items()]
    return table(["D", "never correct", "sometimes", "always", "correct in under 10%"], rows)


def brown_table(groups, setting: str) -> str:
    pass_curves = mean_curves(groups, setting, "pass")
    majority = mean_curves(groups, setting, "majority")
    rows = []
    for d in groups:
        ks, curve = pass_curves[d]
        gain, r2 = log_linear_fit(ks, curve)
        eighth = ks.index(ks[-1] // 8) if ks[-1] // 8 in ks else 0
        rows.append([str(d), f"{gain:.3f}", f"{r2:.2f}", f"{curve[-1] - curve[eighth]:+.3f}",
                     f"{majority[d][1][-1] - majority[d][1][eighth]:+.3f}",
                     f"{majority[d][1][-1]:.3f}"])
    n = next(iter(pass_curves.values()))[0][-1]
    return table(["D", "pass@k gain per doubling of k", "R^2 of pass@k linear in log k",
                  f"pass@{n} - pass@{n // 8}", f"majority@{n} - majority@{n // 8}",
                  f"majority@{n}"], rows)


def runs_table(runs: list[Run], setting: str) -> str:
    rows = []
    for run in runs:
        ev = run.evaluations[setting]
        n = ev.ks[-1]
        rows.append([str(run.train_size), str(run.seed), f"{ev.summary['greedy_accuracy']:.3f}",
                     fmt(run.train_exact_match), f"{ev.summary['pass@1']:.3f}",
                     f"{ev.summary[f'pass@{n}']:.3f}", f"{ev.summary[f'majority@{n}']:.3f}",
                     run.wandb_id or "-"])
    return table(["D", "seed", "greedy", "training's final greedy eval", "pass@1", "pass@n",
                  "majority@n", "wandb run (training)"], rows)


def write_summary(runs, groups, settings, setting, slopes, matches, bins, rates, source, path):
    ev = runs[0].evaluations[setting]
    n, problems = ev.ks[-1], ev.summary["problems"]
    seeds = sorted({run.seed for run in runs})
    text = [
        "# Study B: training data vs test-time sampling", "",
        f"Source: `{source}`; {len(runs)} runs (D {', '.join(map(str, groups))} x seeds "
        f"{', '.join(map(str, seeds))}), {problems} held-out problems, {n} samples each. Main "
        f"setting: {ev.label} (`{setting}`). Accuracies are means over problems, then over seeds.",
        "", "## Accuracy vs k, per training-set size D", "", *accuracy_tables(groups, setting),
        "## Sampling settings", "", settings_table(groups, settings, runs[0]), "",
        "## Iso-accuracy contours: the k at which each D reaches an accuracy", "",
        "Contour points k* (log-interpolated between measured k), pass@k:", "",
        contour_table(groups, slopes, "pass"), "",
        "Common slope over the contours with two or more points (one intercept each); k worth "
        "f x data = f ** -slope; the FLOPs slope uses inference FLOPs per problem instead of k:", "",
        slope_table(slopes), "",
        "Local slopes between neighbouring points of a contour:", "", local_slope_table(slopes), "",
        f"Jones (2021): 10x training compute saves ~{JONES_TEST_PER_10X_TRAIN:g}x test-time compute "
        f"(slope {-np.log10(JONES_TEST_PER_10X_TRAIN):.2f}).", "",
        "## The k that matches 2x and 10x data (measured pairs)", "",
        "k at which the smaller D reaches the bigger D's single-sample accuracy (pass@1, same "
        f"setting) or greedy accuracy; `> {n}` = not reached with {n} samples. Where pass@k falls "
        "short, the line in log k through its last four points says how far it would go "
        f"(an extrapolation, shown up to {64 * n}):", "",
        matching_rows(matches), "",
        "## FLOPs", "", flops_table(groups, setting), "",
        "Training FLOPs are equal across D (fixed steps): more data costs no training compute "
        "here, only the problems themselves.", "",
        "## By difficulty (operand digits)", "", difficulty_table(bins, groups), "",
        "## Per-problem success rates", "", success_table(rates), "",
        "## Coverage and voting (Brown et al. 2024)", "", brown_table(groups, setting), "",
        "## Runs", "", runs_table(runs, setting), "",
    ]
    path.write_text("\n".join(text))


def write_csvs(runs: list[Run], settings: list[str], out: Path) -> None:
    with (out / "runs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["D", "seed", "setting", "n_params", "train_tokens", "train_flops",
                         "prompt_tokens", "tokens_per_sample", "greedy_accuracy", "pass@1",
                         "train_exact_match", "wandb_run", "path"])
        for run in runs:
            for setting in settings:
                ev = run.evaluations[setting]
                writer.writerow([run.train_size, run.seed, setting, run.n_params, run.train_tokens,
                                 f"{run.train_flops:.4g}", f"{ev.prompt_tokens:.3f}",
                                 f"{ev.sample_tokens:.3f}", ev.summary["greedy_accuracy"],
                                 ev.summary["pass@1"], run.train_exact_match, run.wandb_id or "",
                                 run.path])
    with (out / "curves.csv").open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["D", "seed", "setting", "strategy", "k", "accuracy"])
        for run in runs:
            for setting in settings:
                ev = run.evaluations[setting]
                for strategy in ("pass", "majority", "best_logprob", "verifier_eps0",
                                 "verifier_eps0.01", "verifier_eps0.05"):
                    for k, value in zip(ev.ks, ev.curve(strategy)):
                        writer.writerow([run.train_size, run.seed, setting, strategy, k,
                                         f"{value:.6f}"])


def write_json(slopes: dict, matches: list[dict], setting: str, path: Path) -> None:
    data = {"setting": setting, "jones_slope": -float(np.log10(JONES_TEST_PER_10X_TRAIN)),
            "slopes": {s: {k: v for k, v in r.items() if not k.endswith("fit")} for s, r in slopes.items()},
            "matching": matches}
    path.write_text(json.dumps(data, indent=1, default=float) + "\n")


