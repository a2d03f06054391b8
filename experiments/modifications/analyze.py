"""Study C report: tables and plots from a sweep of `experiment=modifications_cpu|_gpu`.

    python experiments/modifications/analyze.py SWEEP_DIR [--out DIR] [--cap init|unigram]

SWEEP_DIR is a Hydra multirun folder (each job: .hydra/config.yaml + metrics.jsonl of a task=text
run). A job's arm is named from its config (the switches that differ from the GPT-2-style
baseline), so narrowed or hand-made sweeps are read the same way. Every number is in validation
bits per byte (bpb) of the job's last eval record at trainer.steps. Writes to --out:

  runs.csv        one row per (arm, lr, seed): status, final bpb, caps, tokens/s, spikes, path
  summary.md      the arm table (best lr, bpb mean ± std, paired difference from the baseline,
                  lr sensitivity, tokens/s, divergences), bpb per arm x lr, missing/partial runs
  bpb_vs_lr.png   final bpb against the learning rate, a line per arm (error bars: std over seeds)
  curves.png      validation bpb and training loss against tokens, each arm at its best lr

Definitions (the README states them too):
  cap L0      the loss at initialisation in bpb, taken as a uniform prediction over the
              vocabulary: ln(V) nats per token converted with the eval set's tokens per byte
              (`--cap unigram`: the unigram model's bpb on the same bytes instead)
  diverged    a non-finite train or eval loss, or a final bpb above the cap; counted at the cap
  sensitivity Wortsman et al. 2023, per seed over the swept lrs E:
              S = mean_{lr in E} min(L(lr), L0) - min_{lr in E} min(L(lr), L0)
              (L: final bpb), reported as mean ± std over seeds
  best lr     per arm, the lr with the lowest mean over seeds of min(L, L0)
  paired diff per seed s: d_s = L(arm, its best lr, s) - L(baseline, its best lr, s); the mean
              of d_s ± t_{0.975, n-1} * sd(d_s) / sqrt(n) over the n seeds both have finished
"""

from __future__ import annotations

import argparse
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

from jaxformer.config import to_dict
from jaxformer.analysis import write_rows_csv
from jaxformer.runs import find_runs

BASELINE = "baseline"
ALL = "all"
# the baseline's value of every switch an arm changes (model=decoder, optim.z_loss 0)
BASE_MODEL = {"mlp": "dense", "activation": "gelu", "norm_type": "layernorm",
              "positions": "learned", "qk_norm": False, "bias": True, "tie_embeddings": True,
              "n_kv_heads": None}
SINGLE = {("norm_type", "rmsnorm"): "rmsnorm", ("positions", "rope"): "rope",
          ("qk_norm", True): "qk_norm", ("bias", False): "no_bias",
          ("tie_embeddings", False): "untied"}
GLU_NAMES = {"silu": "swiglu", "gelu": "geglu", "relu": "reglu", "sigmoid": "glu"}
ALL_PARTS = ("swiglu", "rmsnorm", "rope", "qk_norm", "z_loss", "no_bias", "untied")
ARM_ORDER = (BASELINE, "swiglu", "geglu", "rmsnorm", "rope", "qk_norm", "z_loss", "no_bias",
             "untied", ALL)
SMOOTH = 5  # logged train losses in the running mean of the loss curves
SPIKE = 1.2  # a logged train loss above SPIKE x the median of the SMOOTH logged before it


def arm_name(model: dict, optim: dict) -> str:
    """The arm of a job, from its config: 'baseline', one switch ('swiglu', 'rope', ...), 'all'
    (every switch of the study at once) or the switches joined by '+'; a change outside the
    study's switches is named key=value."""
    parts = []
    if model["mlp"] == "glu":
        parts.append(GLU_NAMES.get(model["activation"], f"glu_{model['activation']}"))
    elif model["activation"] != BASE_MODEL["activation"] or model["mlp"] != BASE_MODEL["mlp"]:
        parts.append(f"mlp={model['mlp']},activation={model['activation']}")
    for key in ("norm_type", "positions", "qk_norm", "bias", "tie_embeddings", "n_kv_heads"):
        value = model.get(key, BASE_MODEL[key])
        if value != BASE_MODEL[key]:
            parts.append(SINGLE.get((key, value), f"{key}={value}"))
    if optim.get("z_loss", 0.0):
        parts.append("z_loss")
    if not parts:
        return BASELINE
    return ALL if sorted(parts) == sorted(ALL_PARTS) else "+".join(parts)


def arm_rank(arm: str) -> tuple:
    return (ARM_ORDER.index(arm) if arm in ARM_ORDER else len(ARM_ORDER), arm)


@dataclass
class Run:
    path: str
    arm: str
    lr: float
    seed: int
    steps: int  # trainer.steps: where a finished run's last eval is
    tokens_per_step: int
    vocab_size: int
    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    n_params: float = float("nan")


def vocab_size(run_dir, config: dict) -> int:
    path = Path(run_dir.path) / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer
        return Tokenizer.from_file(str(path)).get_vocab_size()
    return int(config["model"].get("vocab_size") or config["tokenizer"]["vocab_size"])


def load_sweep(sweep_dir: Path) -> list[Run]:
    runs, params = [], {}
    for run_dir in find_runs(sweep_dir):
        config = to_dict(run_dir.config)
        arm = arm_name(config["model"], config["optim"])
        run = Run(str(run_dir.path), arm, float(config["optim"]["lr"]), int(config["seed"]),
                  int(config["trainer"]["steps"]),
                  int(config["trainer"]["batch_size"]) * int(config["task"]["seq_len"]),
                  vocab_size(run_dir, config))
        for record in run_dir.metrics():
            if record.get("split") == "train":
                run.train.append(record)
            elif record.get("split") == "eval":
                run.evals.append(record)
        if arm not in params:  # the same for every lr and seed of an arm
            try:
                params[arm] = float(run_dir.n_params)
            except Exception:  # noqa: BLE001 (no checkpoint and no corpus to count from)
                params[arm] = float("nan")
        run.n_params = params[arm]
        runs.append(run)
    return runs


# -- per-run numbers ------------------------------------------------------------------------------
def finite(x) -> bool:
    return x is not None and math.isfinite(float(x))


def bytes_ratio(runs: list[Run]) -> float:
    """bpb per nat of loss on the eval set (tokens per byte / ln 2): the median over the runs'
    finite eval records (every job of a sweep evaluates the same rows)."""
    ratios = [e["bpb"] / e["loss"] for run in runs for e in run.evals
              if finite(e.get("bpb")) and finite(e.get("loss")) and e["loss"] > 0]
    return float(np.median(ratios)) if ratios else float("nan")


def count_spikes(run: Run) -> int:
    """Logged train losses above SPIKE x the median of the SMOOTH finite ones logged before it,
    after 10% of the steps (single batches are noisy: a lowest-so-far test counts lucky batches)."""
    spikes, before = 0, []
    for record in run.train:
        loss = record.get("loss")
        if not finite(loss):
            continue
        if record["step"] > 0.1 * run.steps and len(before) >= SMOOTH \
                and loss > SPIKE * float(np.median(before[-SMOOTH:])):
            spikes += 1
        before.append(loss)
    return spikes


def summarize(run: Run, ratio: float, cap: str) -> dict:
    """One row of runs.csv: status (finished | diverged | partial), the final bpb, the caps."""
    final = next((e for e in reversed(run.evals) if e["step"] == run.steps), None)
    last = run.evals[-1] if run.evals else {}
    init_cap = math.log(run.vocab_size) * ratio
    unigram = last.get("unigram_bpb", float("nan"))
    cap_bpb = unigram if cap == "unigram" else init_cap
    nonfinite = (any(not finite(r.get("loss")) or r.get("nonfinite", 0) for r in run.train)
                 or any(not finite(e.get("loss")) for e in run.evals))
    bpb = final["bpb"] if final and finite(final.get("bpb")) else float("nan")
    if nonfinite or (finite(bpb) and bpb > cap_bpb):
        status = "diverged"
    elif final is None:
        status = "partial"
    else:
        status = "finished"
    speeds = [r["tokens_per_s"] for r in run.train[1:] if finite(r.get("tokens_per_s"))]
    return {
        "arm": run.arm, "lr": run.lr, "seed": run.seed, "status": status,
        "steps": run.steps, "last_step": max([r["step"] for r in run.train + run.evals] or [0]),
        "bpb": bpb, "capped_bpb": cap_bpb if status == "diverged" else bpb,
        "eval_loss": final["loss"] if final else float("nan"),
        "cap_bpb": cap_bpb, "init_bpb": init_cap, "unigram_bpb": unigram,
        "zlib_bpb": last.get("zlib_bpb", float("nan")),
        "tokens_per_s": float(np.median(speeds)) if speeds else float("nan"),
        "spikes": count_spikes(run), "n_params": run.n_params, "path": run.path,
    }


# -- the study's statistics (pure functions, unit-tested) --------------------------------------
def lr_sensitivity(losses: dict[float, float], cap: float) -> float:
    """Wortsman et al. 2023: E_lr[min(L(lr), L0)] - min_lr min(L(lr), L0) over the swept lrs
    (a non-finite loss counts as the cap L0)."""
    capped = [min(loss, cap) if finite(loss) else cap for loss in losses.values()]
    return float(np.mean(capped) - np.min(capped)) if capped else float("nan")


def best_lr(mean_by_lr: dict[float, float]) -> float:
    """The lr with the lowest (capped, seed-mean) loss; ties go to the smaller lr; nan when no
    lr has a finite value."""
    candidates = [(loss, lr) for lr, loss in mean_by_lr.items() if finite(loss)]
    return min(candidates)[1] if candidates else float("nan")


def paired_interval(arm: dict[int, float], base: dict[int, float],
                    level: float = 0.95) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of d_s = arm[s] - base[s] over the seeds both have (finite): the
    t-interval mean ± t_{(1+level)/2, n-1} sd / sqrt(n); low = high = nan when n < 2."""
    diffs = np.array([arm[s] - base[s] for s in sorted(arm.keys() & base.keys())
                      if finite(arm[s]) and finite(base[s])])
    n = len(diffs)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    mean = float(diffs.mean())
    if n < 2:
        return mean, float("nan"), float("nan"), 1
    half = float(stats.t.ppf((1 + level) / 2, n - 1) * diffs.std(ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half, n


def mean_std(values) -> tuple[float, float, int]:
    values = [v for v in values if finite(v)]
    if not values:
        return float("nan"), float("nan"), 0
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, len(values)


def arm_table(rows: list[dict]) -> list[dict]:
    """One entry per arm: best lr, bpb at it over seeds, the paired difference from the
    baseline, lr sensitivity over seeds, tokens/s, divergences."""
    by_arm = defaultdict(list)
    for row in rows:
        by_arm[row["arm"]].append(row)
    per_arm = {}
    for arm, members in by_arm.items():
        cells = defaultdict(dict)  # lr -> seed -> capped bpb (finished or diverged runs only)
        for row in members:
            if row["status"] != "partial":
                cells[row["lr"]][row["seed"]] = row["capped_bpb"]
        means = {lr: float(np.mean(list(seeds.values()))) for lr, seeds in cells.items()}
        lr = best_lr(means)
        caps = [row["cap_bpb"] for row in members if finite(row["cap_bpb"])]
        cap = float(np.median(caps)) if caps else float("nan")
        by_seed = defaultdict(dict)
        for this_lr, seeds in cells.items():
            for seed, loss in seeds.items():
                by_seed[seed][this_lr] = loss
        all_lrs = set(cells)
        sens = [lr_sensitivity(losses, cap) for losses in by_seed.values()
                if set(losses) == all_lrs and len(all_lrs) > 1]  # one lr: nothing to measure
        at_best = cells.get(lr, {})
        per_arm[arm] = {
            "arm": arm, "best_lr": lr, "at_best": at_best,
            "bpb": mean_std(at_best.values()),
            "sensitivity": mean_std(sens),
            "tokens_per_s": float(np.median([r["tokens_per_s"] for r in members
                                             if finite(r["tokens_per_s"])] or [np.nan])),
            "n_params": members[0]["n_params"],
            "diverged": sum(r["status"] == "diverged" for r in members),
            "spikes": sum(r["spikes"] for r in members),
            "runs": len(members), "lrs": sorted(cells),
        }
    base = per_arm.get(BASELINE)
    for entry in per_arm.values():
        entry["diff"] = (paired_interval(entry["at_best"], base["at_best"]) if base
                         else (float("nan"),) * 3 + (0,))
    return [per_arm[arm] for arm in sorted(per_arm, key=arm_rank)]


def incomplete(rows: list[dict]) -> list[str]:
    """Partial runs, and every (arm, lr, seed) of the observed arms x lrs x seeds that has no
    run: listed, never dropped silently."""
    lines = [f"- partial (no eval at step {r['steps']}; last step {r['last_step']}): "
             f"{r['arm']} lr {r['lr']:g} seed {r['seed']} ({r['path']})"
             for r in rows if r["status"] == "partial"]
    have = {(r["arm"], r["lr"], r["seed"]) for r in rows}
    arms = sorted({r["arm"] for r in rows}, key=arm_rank)
    lrs, seeds = sorted({r["lr"] for r in rows}), sorted({r["seed"] for r in rows})
    lines += [f"- missing: {arm} lr {lr:g} seed {seed}" for arm in arms for lr in lrs
              for seed in seeds if (arm, lr, seed) not in have]
    return lines


# -- writing --------------------------------------------------------------------------------------
def fmt(x: float, spec: str = ".4f") -> str:
    return format(x, spec) if finite(x) else "n/a"


def write_summary(rows: list[dict], table: list[dict], source: str, cap: str, path: Path) -> None:
    lrs = sorted({r["lr"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    cap_value = float(np.median([r["cap_bpb"] for r in rows if finite(r["cap_bpb"])] or [np.nan]))
    text = [
        "# Study C: modifications of the GPT-2-style decoder", "",
        f"Source: `{source}`; {len(rows)} runs, arms x lrs {[f'{x:g}' for x in lrs]} x seeds {seeds}. "
        f"Numbers are validation bits per byte at the last step; a diverged run counts at the cap "
        f"L0 = {fmt(cap_value)} bpb ({'unigram model' if cap == 'unigram' else 'loss at init: uniform over the vocabulary'}).",
        "",
        "| arm | params | best lr | bpb at best lr (mean ± std, n) | minus baseline [95% paired t-interval] (n) "
        "| lr sensitivity (mean ± std) | tokens/s | diverged / runs | spikes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in table:
        (m, s, n), (d, lo, hi, nd), (sm, ss, sn) = e["bpb"], e["diff"], e["sensitivity"]
        diff = "—" if e["arm"] == BASELINE else f"{fmt(d, '+.4f')} [{fmt(lo, '+.4f')}, {fmt(hi, '+.4f')}] ({nd})"
        text.append(f"| {e['arm']} | {fmt(e['n_params'], ',.0f')} | {fmt(e['best_lr'], 'g')} | "
                    f"{fmt(m)} ± {fmt(s)} ({n}) | {diff} | {fmt(sm)} ± {fmt(ss)} ({sn}) | "
                    f"{fmt(e['tokens_per_s'], ',.0f')} | {e['diverged']} / {e['runs']} | {e['spikes']} |")
    text += ["", "## Final bpb per arm and learning rate (mean over seeds of min(bpb, L0); "
             "d: diverged runs)", "",
             "| arm | " + " | ".join(f"lr {x:g}" for x in lrs) + " |",
             "|---|" + "---|" * len(lrs)]
    for e in table:
        cells = []
        for lr in lrs:
            members = [r for r in rows if r["arm"] == e["arm"] and r["lr"] == lr
                       and r["status"] != "partial"]
            value = mean_std([r["capped_bpb"] for r in members])[0]
            n_div = sum(r["status"] == "diverged" for r in members)
            cells.append(fmt(value) + (f" ({n_div}d)" if n_div else ""))
        text.append(f"| {e['arm']} | " + " | ".join(cells) + " |")
    missing = incomplete(rows)
    text += ["", "## Missing and partial runs", "", *(missing or ["- none"]), "",
             "Definitions: lr sensitivity (Wortsman et al. 2023), per seed over the swept lrs E: "
             "mean_{lr in E} min(L(lr), L0) - min_{lr in E} min(L(lr), L0); only seeds with every "
             "lr count. Paired difference: per seed, the arm at its best lr minus the baseline at "
             "its best lr; t-interval over seeds. Spikes: logged train losses above "
             f"{SPIKE} x the median of the {SMOOTH} logged before it, after 10% of the steps.", ""]
    path.write_text("\n".join(text))


CSV_COLUMNS = ("arm", "lr", "seed", "status", "steps", "last_step", "bpb", "capped_bpb",
               "eval_loss", "cap_bpb", "init_bpb", "unigram_bpb", "zlib_bpb", "tokens_per_s",
               "spikes", "n_params", "path")


def save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=90, bbox_inches="tight")


def colors(arms: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps
    cmap = colormaps["tab10"]
    return {arm: cmap(i % 10) for i, arm in enumerate(arms)}


def plot_bpb_vs_lr(rows: list[dict], table: list[dict], path: Path) -> None:
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    palette = colors([e["arm"] for e in table])
    for e in table:
        members = [r for r in rows if r["arm"] == e["arm"] and r["status"] != "partial"]
        lrs = sorted({r["lr"] for r in members})
        stats_ = [mean_std([r["capped_bpb"] for r in members if r["lr"] == lr]) for lr in lrs]
        style = dict(lw=2.2, color="black") if e["arm"] == BASELINE else dict(lw=1.3)
        ax.errorbar(lrs, [m for m, _, _ in stats_], yerr=[s for _, s, _ in stats_], marker="o",
                    ms=3.5, capsize=2, label=e["arm"], **{"color": palette[e["arm"]], **style})
        diverged = [r for r in members if r["status"] == "diverged"]
        if diverged:
            ax.scatter([r["lr"] for r in diverged], [r["capped_bpb"] for r in diverged],
                       marker="x", color=palette[e["arm"]], zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("validation bits per byte (diverged: x, at the cap)")
    ax.set_title("final bpb vs learning rate (mean ± std over seeds)")
    ax.legend(fontsize=7, ncol=2)
    save(fig, path)


def plot_curves(runs: list[Run], table: list[dict], path: Path) -> None:
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_eval, ax_train = fig.subplots(1, 2)
    palette = colors([e["arm"] for e in table])
    for e in table:
        members = [r for r in runs if r.arm == e["arm"] and r.lr == e["best_lr"]]
        if not members:
            continue
        style = dict(lw=2.2, color="black") if e["arm"] == BASELINE else dict(lw=1.2)
        style = {"color": palette[e["arm"]], **style}
        label = f"{e['arm']} (lr {e['best_lr']:g})"
        evals = defaultdict(list)
        trains = defaultdict(list)
        for run in members:
            for rec in run.evals:
                if finite(rec.get("bpb")):
                    evals[rec["step"] * run.tokens_per_step].append(rec["bpb"])
            losses = [r["loss"] for r in run.train]
            for i, rec in enumerate(run.train):
                window = [x for x in losses[max(0, i - SMOOTH + 1): i + 1] if finite(x)]
                if window:
                    trains[rec["step"] * run.tokens_per_step].append(float(np.mean(window)))
        xs = sorted(evals)
        ax_eval.plot(xs, [np.mean(evals[x]) for x in xs], marker="o", ms=3, label=label, **style)
        xs = sorted(trains)
        ax_train.plot(xs, [np.mean(trains[x]) for x in xs], label=label, **style)
    ax_eval.set(xlabel="training tokens", ylabel="validation bits per byte",
                title="validation bpb, each arm at its best lr (seed mean)")
    ax_train.set(xlabel="training tokens", ylabel=f"training loss (nats/token, mean of {SMOOTH} logs)",
                 title="training loss, each arm at its best lr (seed mean)")
    ax_eval.legend(fontsize=7)
    save(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="a Hydra multirun folder")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--cap", choices=("init", "unigram"), default="init",
                        help="L0 of the lr sensitivity and the divergence test: the loss at "
                             "init (uniform over the vocabulary) or the unigram model's bpb")
    args = parser.parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax: "read only" notes per checkpoint
    runs = load_sweep(Path(args.sweep_dir))
    if not runs:
        raise SystemExit(f"error: no run dirs (.hydra/config.yaml) under {args.sweep_dir}")
    ratio = bytes_ratio(runs)
    rows = [summarize(run, ratio, args.cap) for run in runs]
    rows.sort(key=lambda r: (arm_rank(r["arm"]), r["lr"], r["seed"]))
    table = arm_table(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_rows_csv(out / "runs.csv", CSV_COLUMNS, rows)
    write_summary(rows, table, args.sweep_dir, args.cap, out / "summary.md")
    plot_bpb_vs_lr(rows, table, out / "bpb_vs_lr.png")
    plot_curves(runs, table, out / "curves.png")
    missing = incomplete(rows)
    print(f"{len(rows)} runs, {len(table)} arms -> {out}"
          + (f" ({len(missing)} missing or partial: see summary.md)" if missing else ""))


if __name__ == "__main__":
    main()
