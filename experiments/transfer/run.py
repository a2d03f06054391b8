"""experiments/transfer: does pre-training a decoder to sort help it learn is_sorted from few labels?

Stage 1 pre-trains `experiment=transfer_sort_pretrain`; stage 2 trains
`experiment=transfer_is_sorted_finetune` (the same decoder plus a new last-token classifier) on
`task.train_size` labelled examples under four arms, each a plain `jaxformer.train` config:

  scratch       no init_from: the same model and data, random initialisation
  full          init_from the stage-1 run, every parameter trains
  frozen_lower  init_from, embeddings and the lowest 2 of 3 blocks frozen
  head_only     init_from, only the new classifier trains (a linear probe)

Every run is composed from conf/ exactly as `python -m jaxformer.train <overrides>` would compose it
(the equivalent command lines go to results/runs.csv) and runs in this process, sharing one XLA
compilation cache. Writes results/runs.csv, results/table.md and results/accuracy_vs_examples.png.

    python experiments/transfer/run.py                       # the committed results
    python experiments/transfer/run.py --sizes 32 128 --seeds 0 --workdir /tmp/transfer  # quicker

--workdir must be empty (timings are only honest for fresh runs); with --reuse, runs already
finished there are evaluated again instead of retrained (their seconds are then evaluation only).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import platform
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from jaxformer.config import register_configs, to_train_config  # noqa: E402
from jaxformer.training.loop import train  # noqa: E402

ARMS = {
    "scratch": [],
    "full": ["finetune.init_from={pretrained}"],
    "frozen_lower": ["finetune.init_from={pretrained}", "finetune.freeze=[embeddings]",
                     "finetune.freeze_lower_blocks=2"],
    "head_only": ["finetune.init_from={pretrained}", "finetune.mode=head_only"],
}
QUIET = ["logger.wandb.mode=disabled", "trainer.progress=false"]
RESULTS = Path(__file__).resolve().parent / "results"


def run(overrides: list[str], run_dir: Path):
    """Compose conf/train.yaml with `overrides` (as the CLI would) and train in this process."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        config = to_train_config(compose("train", overrides=overrides))
    start = time.perf_counter()
    result = train(config, run_dir, job_name=run_dir.name)
    return result, time.perf_counter() - start


def shown(path: Path) -> str:
    """`path` relative to the repository when it is inside it (what a reader can rerun)."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def command(overrides: list[str], run_dir: Path) -> str:
    return shlex.join(["python", "-m", "jaxformer.train", *overrides,
                       f"hydra.run.dir={shown(run_dir)}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "outputs" / "transfer")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 128, 512, 2048])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--reuse", action="store_true", help="evaluate finished runs again")
    args = parser.parse_args()
    workdir = args.workdir.absolute()
    if workdir.is_dir() and any(workdir.iterdir()) and not args.reuse:
        sys.exit(f"error: --workdir {workdir} is not empty: delete it, choose another, or pass "
                 "--reuse to evaluate its finished runs again")
    for noisy in ("absl", "orbax", "jax", "jaxformer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    register_configs()
    jax.config.update("jax_compilation_cache_dir", str(workdir / "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    began = time.perf_counter()

    pretrained = workdir / "pretrain"
    pre_overrides = ["experiment=transfer_sort_pretrain", *QUIET]
    pre, pre_seconds = run(pre_overrides, pretrained)
    print(f"pretrain (sort): held-out exact match {pre.eval_metrics['exact_match']:.3f} "
          f"after {pre.step} steps, {pre_seconds:.0f} s", flush=True)

    rows = []
    for n in args.sizes:
        for seed in args.seeds:
            for arm, arm_overrides in ARMS.items():
                overrides = ["experiment=transfer_is_sorted_finetune", f"task.train_size={n}",
                             f"seed={seed}", *QUIET,
                             *(o.format(pretrained=shown(pretrained)) for o in arm_overrides)]
                run_dir = workdir / f"{arm}_n{n}_seed{seed}"
                result, seconds = run(overrides, run_dir)
                accuracy = result.eval_metrics["exact_match"]
                rows.append({"arm": arm, "train_size": n, "seed": seed,
                             "accuracy": round(accuracy, 4),
                             "eval_loss": round(result.eval_metrics["loss"], 4),
                             "seconds": round(seconds, 1), "command": command(overrides, run_dir)})
                print(f"{arm:>12}  n={n:<5} seed={seed}  accuracy {accuracy:.3f}  "
                      f"({seconds:.0f} s)", flush=True)
    total = time.perf_counter() - began
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "runs.csv")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        stage2 = to_train_config(compose("train", ["experiment=transfer_is_sorted_finetune"]))
    write_table(rows, args, pre, command(pre_overrides, pretrained), stage2, total,
                args.out / "table.md")
    plot(rows, args.out / "accuracy_vs_examples.png")
    print(f"wrote {args.out}/runs.csv, table.md, accuracy_vs_examples.png ({total / 60:.1f} min)")


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def by_arm(rows: list[dict]) -> dict[str, dict[int, list[float]]]:
    table: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        table[row["arm"]][row["train_size"]].append(row["accuracy"])
    return table


def write_table(rows: list[dict], args, pre, pre_command: str, stage2, total: float,
                path: Path) -> None:
    table = by_arm(rows)
    sizes = sorted({row["train_size"] for row in rows})
    lines = [
        "# Transfer: sort-pretrained decoder -> is_sorted classifier (generated by run.py)",
        "",
        f"Command: `python experiments/transfer/run.py --sizes {' '.join(map(str, args.sizes))} "
        f"--seeds {' '.join(map(str, args.seeds))}{' --reuse' if args.reuse else ''}`",
        f"({total / 60:.1f} min wall on {platform.machine()} CPU x {jax.device_count()} device, "
        f"{os.cpu_count()} cores, jax {jax.__version__}; every run's own command is in runs.csv).",
        "",
        f"Stage 1: `{pre_command}` -> held-out sort exact match "
        f"{pre.eval_metrics['exact_match']:.3f} after {pre.step} steps.",
        "",
        f"Held-out is_sorted accuracy ({stage2.task.eval_size} balanced problems, none seen in "
        f"either stage), mean over seeds {', '.join(map(str, args.seeds))} (min-max in brackets), "
        f"after {stage2.trainer.steps} steps of batch {stage2.trainer.batch_size}:",
        "",
        "| arm | " + " | ".join(f"{n} examples" for n in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for arm in ARMS:
        cells = []
        for n in sizes:
            values = table[arm][n]
            spread = f" ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else ""
            cells.append(f"{np.mean(values):.3f}{spread}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    table = by_arm(rows)
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for arm in ARMS:
        sizes = sorted(table[arm])
        line, = ax.plot(sizes, [np.mean(table[arm][n]) for n in sizes], marker="o", label=arm)
        for n in sizes:  # every seed, faintly
            ax.scatter([n] * len(table[arm][n]), table[arm][n], color=line.get_color(), alpha=0.3,
                       s=12)
    ax.axhline(0.5, color="grey", linestyle=":", label="chance")
    ax.set_xscale("log", base=2)
    sizes = sorted({row["train_size"] for row in rows})
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()
    ax.set_xlabel("labelled is_sorted examples (task.train_size)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0.4, 1.02)
    ax.set_title("decoder pre-trained on sort, fine-tuned to classify is_sorted")
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
