"""Study B report: how many test-time samples buy as much accuracy as 2x or 10x more training data.

    python experiments/data_vs_test_time/analyze.py SWEEP_DIR [--out DIR] [--setting T1-k0-p1]

SWEEP_DIR is the sweep of `experiment=data_vs_test_time[_cpu]` after run.py evaluated it: one dir
per training run (.hydra/config.yaml, metrics.jsonl) holding test_time/<settings>/summary.json and
samples.jsonl from `python -m jaxformer.evaluate`. Every accuracy is the mean over held-out problems
as jaxformer/inference/selection.py defines it; seeds of a training-set size D are averaged. --setting picks
the sampling setting of the main figures (default: temperature 1, no top-k / top-p). Writes to --out:

  summary.md           markdown tables: accuracy vs k per D and strategy, sampling settings, the
                       iso-accuracy slope, the k that matches 2x / 10x data, FLOPs, difficulty bins
  runs.csv             one row per run and setting: D, seed, parameters, tokens, FLOPs, accuracies
  curves.csv           every strategy at every k, per run and setting
  tradeoff.json        the fitted slopes, matching k and FLOPs in numbers
  accuracy_vs_k.png    accuracy vs log k, a line per D, one panel per strategy
  iso_accuracy.png     iso-accuracy contours in the (log D, log k) plane with the fitted slope
  flops.png            accuracy vs inference FLOPs per problem, and the contours in FLOPs
  by_difficulty.png    pass@k and majority@k per difficulty bin (operand digits)
  success_histogram.png  per-problem share of correct samples, per D
  settings.png         pass@k and majority@k of every sampling setting, per D
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the sibling modules, also when a test imports this file by path
    sys.path.insert(0, str(HERE))

import figures  # noqa: E402
import report  # noqa: E402
from sweep import (  # noqa: E402
    STRATEGIES, Run, by_size, common_settings, inference_flops, load_sweep, mean_curves, mean_over,
    pick_setting, seed_range,
)
from tradeoff import extrapolate_k, fit_common_slope, iso_accuracy, k_to_reach  # noqa: E402

from jaxformer.errors import UserError  # noqa: E402
from jaxformer.inference.selection import majority_at_k, pass_at_k  # noqa: E402

TARGETS = tuple(round(0.1 * i, 1) for i in range(1, 10))  # accuracies of the iso-accuracy contours


# -- the trade-off --------------------------------------------------------------------------------
def slope_report(groups: dict[int, list[Run]], setting: str) -> dict:
    """Per strategy: contour points, the common slope in samples and in inference FLOPs, and one
    slope per seed (the same fit on that seed's runs alone) to show the spread."""
    report = {}
    for strategy in STRATEGIES:
        contours = iso_accuracy(mean_curves(groups, setting, strategy), TARGETS)
        fit = fit_common_slope(contours)
        flops = {a: [(d, inference_flops(groups[d], setting, k)) for d, k in points]
                 for a, points in contours.items()}
        flops_fit = fit_common_slope(flops)
        seeds = sorted({run.seed for members in groups.values() for run in members})
        per_seed = {}
        for seed in seeds:
            one = {d: [r for r in members if r.seed == seed] for d, members in groups.items()}
            seed_fit = fit_common_slope(iso_accuracy(
                mean_curves({d: m for d, m in one.items() if m}, setting, strategy), TARGETS))
            per_seed[seed] = seed_fit.slope if seed_fit else None
        report[strategy] = {
            "contours": {str(a): points for a, points in contours.items()},
            "slope": fit.slope if fit else None, "r2": fit.r2 if fit else None,
            "points": fit.points if fit else 0, "contours_fitted": fit.contours if fit else 0,
            "k_for_2x_data": fit.k_factor(2) if fit else None,
            "k_for_10x_data": fit.k_factor(10) if fit else None,
            "flops_slope": flops_fit.slope if flops_fit else None,
            "flops_contours": {str(a): points for a, points in flops.items()},
            "slope_per_seed": per_seed, "fit": fit, "flops_fit": flops_fit}
    return report


def matching_table(groups: dict[int, list[Run]], setting: str) -> list[dict]:
    """For every pair (D, f*D) in the grid with f = 2 or 10: the k at which D's curves reach the
    bigger set's single-sample accuracy (pass@1 of the same setting) and its greedy accuracy."""
    rows = []
    for factor in (2, 10):
        for d in groups:
            if d * factor not in groups:
                continue
            big = groups[d * factor]
            targets = {"pass@1": mean_over(big, lambda r: r.evaluations[setting].summary["pass@1"]),
                       "greedy": mean_over(big, lambda r: r.evaluations[setting].summary[
                           "greedy_accuracy"])}
            for reference, target in targets.items():
                row = {"factor": factor, "D": d, "D_big": d * factor, "reference": reference,
                       "target": target}
                for strategy in STRATEGIES:
                    ks, curve = mean_curves({d: groups[d]}, setting, strategy)[d]
                    k = k_to_reach(ks, curve, target)
                    row[strategy] = k
                    if strategy == "pass":
                        row["max_k"] = ks[-1]
                        row["pass_extrapolated"] = (extrapolate_k(ks, curve, target)
                                                    if k is None else None)
                        row["extra_flops"] = (inference_flops(groups[d], setting, k)
                                              - inference_flops(groups[d], setting, 1)
                                              if k is not None else None)
                row["train_flops"] = mean_over(groups[d], lambda r: r.train_flops)
                rows.append(row)
    return rows


# -- per-problem views (the main setting only) ----------------------------------------------------
def by_difficulty(groups: dict[int, list[Run]], setting: str, resamples: int) -> dict:
    """{strategy: {bin: {D: (ks, accuracy)}}} for greedy, pass and majority, seeds averaged;
    majority is re-estimated per problem here (`resamples` draws, seeded)."""
    rng = np.random.default_rng(0)
    out: dict = {"pass": defaultdict(dict), "majority": defaultdict(dict), "greedy": defaultdict(dict),
                 "problems": {}}
    for d, members in groups.items():
        per_run = []
        for run in members:
            ev = run.evaluations[setting]
            n = ev.correct.shape[1]
            c = ev.correct.sum(axis=1)
            per_run.append((ev, {"pass": np.stack([pass_at_k(n, c, k) for k in ev.ks]),
                                 "majority": np.stack([majority_at_k(ev.ids, ev.correct, k,
                                                                     resamples, rng)
                                                       for k in ev.ks])}))
        ev0 = members[0].evaluations[setting]
        for digits in sorted(set(ev0.difficulty.tolist())):
            mask = ev0.difficulty == digits
            out["problems"][digits] = int(mask.sum())
            out["greedy"][digits][d] = float(np.mean([ev.greedy_correct[mask].mean()
                                                      for ev, _ in per_run]))
            for strategy in ("pass", "majority"):
                out[strategy][digits][d] = (ev0.ks, np.mean(
                    [values[strategy][:, mask].mean(axis=1) for _, values in per_run], axis=0))
    return out


def success_rates(groups: dict[int, list[Run]], setting: str) -> dict[int, np.ndarray]:
    """{D: per-problem share of correct samples, every seed's problems pooled}."""
    return {d: np.concatenate([run.evaluations[setting].correct.mean(axis=1) for run in members])
            for d, members in groups.items()}



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="the sweep dir of run.py, e.g. "
                                          "multirun/data_vs_test_time_cpu/sweep")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--setting", default="T1-k0-p1",
                        help="the main sampling setting: a settings key without its step, or its "
                             "start (default: temperature 1, no top-k / top-p)")
    parser.add_argument("--resamples", type=int, default=200,
                        help="draws per problem for majority@k by difficulty bin")
    args = parser.parse_args(argv)
    try:
        runs = load_sweep(Path(args.sweep_dir))
        settings = common_settings(runs)
        setting = pick_setting(settings, args.setting)
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    problems = {run.evaluations[setting].difficulty.tobytes() for run in runs}
    if len(problems) > 1:
        raise SystemExit("error: the runs were evaluated on different held-out problems "
                         "(task.eval_size or task.split_seed differ): analyse one sweep at a time")
    groups = by_size(runs)
    slopes = slope_report(groups, setting)
    matches = matching_table(groups, setting)
    bins = by_difficulty(groups, setting, args.resamples)
    rates = success_rates(groups, setting)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_summary(runs, groups, settings, setting, slopes, matches, bins, rates,
                         args.sweep_dir, out / "summary.md")
    report.write_csvs(runs, settings, out)
    report.write_json(slopes, matches, setting, out / "tradeoff.json")
    label = runs[0].evaluations[setting].label
    greedy = {d: mean_over(m, lambda r: r.evaluations[setting].summary["greedy_accuracy"])
              for d, m in groups.items()}
    figures.accuracy_vs_k({s: mean_curves(groups, setting, s) for s in STRATEGIES},
                          {s: seed_range(groups, setting, s) for s in STRATEGIES}, STRATEGIES,
                          greedy, label, out / "accuracy_vs_k.png")
    shown = ("pass", "verifier_eps0.05")
    figures.iso_accuracy({s: mean_curves(groups, setting, s) for s in shown},
                         {s: slopes[s] for s in shown}, {s: STRATEGIES[s] for s in shown},
                         out / "iso_accuracy.png")
    in_flops = {strategy: {d: ([inference_flops(groups[d], setting, k) for k in ks], curve)
                           for d, (ks, curve) in mean_curves(groups, setting, strategy).items()}
                for strategy in ("pass", "majority")}
    figures.flops(in_flops["pass"], in_flops["majority"],
                  {d: (inference_flops(m, setting, 1, greedy=True), greedy[d])
                   for d, m in groups.items()},
                  slopes["pass"], runs[0].train_flops, label, out / "flops.png")
    figures.by_difficulty(bins, label, out / "by_difficulty.png")
    figures.success_histogram(rates, label, out / "success_histogram.png")
    figures.settings({(s, strategy): mean_curves(groups, s, strategy)
                      for s in settings for strategy in ("pass", "majority")},
                     {s: runs[0].evaluations[s].label for s in settings}, out / "settings.png")
    fit = slopes["pass"]
    print(f"{len(runs)} runs, {len(settings)} settings -> {out}")
    print(f"pass@k iso-accuracy slope {report.fmt(fit['slope'], '.2f')}: k worth 2x data "
          f"{report.fmt(fit['k_for_2x_data'], '.3g')}, 10x data "
          f"{report.fmt(fit['k_for_10x_data'], '.3g')}")


if __name__ == "__main__":
    main()

