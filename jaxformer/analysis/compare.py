"""`python -m jaxformer.compare PATH...` (jaxformer/cli/compare.py): runs compared from their
directories, without a dashboard.

Every run dir under PATH... (run dirs, and sweep dirs at any depth: jaxformer/runs.py:find_runs)
is read with the one run reader. Runs are grouped by the config keys that differ between them
(`by`: chosen keys instead; `by=[]`: one group), leaving out the keys that say nothing about what
was trained (IGNORED: the seed, which is pooled, names, paths, logging and saving); the seeds of
a group are pooled as mean ± sample standard deviation over the runs that have the value
("(n=1)" marks a value fewer runs than the group's have); its eval metrics over its finished
runs (all of them when none finished). Per group: the final and the best value
of each eval metric, steps, tokens seen (steps x batch size x positions per example, what
tokens_per_s counts), parameters, tokens/s (the median of the train records), wall time
(RunDir.wall_time) and the states of its runs. Written to `out` (default: compare/ beside the
first path):

  compare.md    the table, every eval metric, the runs one by one, the incomplete runs, the plot
  compare.csv   one row per group: each number as NAME_mean, NAME_std, NAME_n
  runs.csv      one row per run, incomplete and unreadable runs included
  METRIC.png    the metric (default: eval bpb, else eval loss, else train loss) against step,
                tokens and FLOPs (6 x params x tokens): per group a line (the mean over its
                seeds) and a band from its lowest to its highest seed

A run that is not finished (running, interrupted, diverged, not started), has no eval records,
or whose config cannot be read is listed under "incomplete runs", never dropped.
"""

from __future__ import annotations

import csv
import difflib
import math
import os
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from omegaconf import MISSING

from jaxformer.config import lower_is_better
from jaxformer.errors import UserError
from jaxformer.runs import (
    DIVERGED, FINISHED_STATE, INTERRUPTED, NOT_STARTED, RUNNING, TIMING_KEYS, RunDir, find_runs,
)

USAGE = "python -m jaxformer.compare RUN_OR_SWEEP_DIR... [--by KEY,KEY] [--metric NAME] [--out DIR]"
# config keys that differ between runs without changing what is trained: never grouped by
# unless `by` names them (the seed is pooled)
IGNORED = {"seed", "name", "trainer.progress", "trainer.log_every", "trainer.checkpoint_every",
           "trainer.keep_checkpoints", "trainer.keep_best", "trainer.best_metric",
           "trainer.best_mode", "trainer.num_samples", "trainer.eval_batch_size",
           "trainer.compilation_cache_dir", "trainer.checkpoint_minutes",
           "mesh.coordinator_address", "mesh.num_processes", "mesh.process_id",
           "task.data_dir", "data.paths", "data.exclude", "data.out_dir", "tokenizer.path",
           "finetune.init_from"}
IGNORED_SECTIONS = ("logger.", "score.")  # score: what a search optimises
HEADLINE = ("loss", "bpb", "perplexity", "accuracy", "exact_match")  # the printed table's metrics
# train-record fields that are bookkeeping, not metrics to plot
TRAIN_BOOKKEEPING = {"count", "nonfinite", "skipped_steps", "lr", "epoch", *TIMING_KEYS}
DEFAULT_METRICS = ("eval/bpb", "eval/loss", "train/loss")  # the plot's metric, first present


@dataclass
class CompareConfig:
    paths: list[str] = MISSING  # run dirs and sweep dirs (searched at any depth)
    by: Optional[list[str]] = None  # config keys to group by; None: those that differ between runs
    metric: Optional[str] = None  # the plot's metric: NAME (eval), eval/NAME or train/NAME;
    #                               None: eval bpb, else eval loss, else train loss
    out: Optional[str] = None  # the output folder; None: compare/ beside the first path

    def __post_init__(self) -> None:
        if not self.paths:
            raise UserError(f"no paths given: {USAGE}")
        for path in self.paths:
            if not Path(path).exists():
                raise UserError(f"{path} does not exist: pass run dirs or sweep dirs written by "
                                "python -m jaxformer.train")
            if not find_runs(path):
                raise UserError(f"{path} holds no runs (no .hydra/config.yaml at any depth): pass "
                                "run dirs or sweep dirs written by python -m jaxformer.train")

    @property
    def output_dir(self) -> Path:
        return Path(self.out) if self.out else \
            Path(os.path.abspath(self.paths[0])).parent / "compare"


# -- one run --------------------------------------------------------------------------------------
@dataclass
class RunRow:
    """What the comparison knows of one run."""

    path: Path
    state: str
    config: dict[str, Any] = field(default_factory=dict)  # flattened; {}: unreadable
    problems: list[str] = field(default_factory=list)  # why it is incomplete ([]: it is not)
    steps: int | None = None  # the last train record's step
    tokens_per_step: int | None = None
    params: int | None = None
    tokens_per_s: float | None = None
    wall_s: float | None = None
    # eval/NAME, train/NAME -> (step, value) in the records' order
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def tokens(self) -> int | None:
        return None if self.steps is None or self.tokens_per_step is None else \
            self.steps * self.tokens_per_step

    @property
    def final(self) -> dict[str, float]:
        """eval metric -> its value at the last evaluation."""
        return {name[5:]: curve[-1][1] for name, curve in self.curves.items()
                if name.startswith("eval/")}

    @property
    def best(self) -> dict[str, float]:
        """eval metric -> its best value over the evaluations (nan only if all are)."""
        best = {}
        for name, curve in self.curves.items():
            if name.startswith("eval/"):
                finite = [v for _, v in curve if math.isfinite(v)]
                pick = min if lower_is_better(name) else max
                best[name[5:]] = pick(finite) if finite else math.nan
        return best


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_curves(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """eval/NAME, train/NAME -> (step, value) in the records' order (train bookkeeping left out)."""
    curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for record in records:
        split = record.get("split")
        if split not in ("train", "eval"):
            continue
        for key, value in record.items():
            if key not in ("step", "split") and is_number(value) and not (
                    split == "train" and key in TRAIN_BOOKKEEPING):
                curves[f"{split}/{key}"].append((int(record["step"]), float(value)))
    return dict(curves)


def read_run(run: RunDir) -> RunRow:
    records = run.metrics()
    row = RunRow(run.path, run.state(records))
    row.curves = metric_curves(records)
    train = [r for r in records if r.get("split") == "train"]
    row.steps = train[-1]["step"] if train else None
    rates = [r["tokens_per_s"] for r in train if r.get("tokens_per_s")]
    row.tokens_per_s = statistics.median(rates) if rates else None
    try:
        row.config = run.flat_config
    except UserError as err:
        row.problems.append(f"config unreadable: {err}")
    if row.config:
        row.tokens_per_step = run.tokens_per_step
        row.wall_s = run.wall_time(records)
        try:
            row.params = run.n_params
        except (UserError, OSError):
            pass  # a text task whose corpus is elsewhere, and no checkpoint yet: unknown
    row.problems += state_problems(row, train, run)
    if not any(name.startswith("eval/") for name in row.curves) and row.state != NOT_STARTED:
        row.problems.append("no eval records")
    return row


def state_problems(row: RunRow, train: list[dict], run: RunDir) -> list[str]:
    target = f" of {row.config['trainer.steps']}" if "trainer.steps" in row.config else ""
    if row.state == NOT_STARTED:
        return ["not started: no metric records" if run.metrics_path.exists() else
                "not started: no metrics.jsonl"]
    if row.state == DIVERGED:
        last = train[-1]
        return [f"diverged: non-finite training step {last['step']} (loss {last.get('loss')}, "
                f"{int(last.get('skipped_steps', 0))} steps skipped)"]
    if row.state in (INTERRUPTED, RUNNING):
        return [f"{row.state} at step {row.steps}{target}" if row.steps is not None else
                f"{row.state} before its first train record"]
    return []


# -- grouping -------------------------------------------------------------------------------------
def hashable(value: Any) -> Any:
    return tuple(hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


def is_ignored(key: str) -> bool:
    return key in IGNORED or key.startswith(IGNORED_SECTIONS)


def config_keys(rows: list[RunRow]) -> list[str]:
    """Every config key of the readable runs, in the config's own order."""
    return list(dict.fromkeys(key for row in rows for key in row.config))


def differing_keys(rows: list[RunRow], ignored: bool = False) -> list[str]:
    """The config keys whose values differ between the readable runs (`ignored`: those of them
    that IGNORED leaves out; else the others)."""
    configs = [row.config for row in rows if row.config]
    return [key for key in config_keys(rows) if is_ignored(key) == ignored
            and len({hashable(config.get(key, MISSING)) for config in configs}) > 1]


def check_by(by: list[str], rows: list[RunRow]) -> list[str]:
    known = config_keys(rows)
    for key in by:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            differing = ", ".join(differing_keys(rows)) or "none"
            raise UserError(f"by={key} is not a config key of these runs: {hint}(keys that differ "
                            f"between them: {differing}; any training config key works, e.g. "
                            "model.n_layers)")
    return list(by)


def sort_key(values: tuple) -> tuple:
    return tuple((0, v, "") if is_number(v) else (1, 0, str(v)) for v in values)


@dataclass
class Group:
    values: tuple  # of the `by` keys
    rows: list[RunRow]

    def label(self, by: list[str]) -> str:
        return ", ".join(f"{k}={v}" for k, v in zip(by, self.values)) or "all runs"


def group_rows(rows: list[RunRow], by: list[str]) -> list[Group]:
    groups: dict[tuple, list[RunRow]] = defaultdict(list)
    for row in rows:
        if row.config:  # an unreadable run belongs to no group: it is listed as incomplete
            groups[tuple(hashable(row.config.get(key)) for key in by)].append(row)
    return [Group(values, groups[values]) for values in sorted(groups, key=sort_key)]


# -- pooling seeds --------------------------------------------------------------------------------
@dataclass
class Stat:
    mean: float
    std: float  # sample standard deviation (nan for one value)
    n: int
    low: float
    high: float


def pool(values: list[float | None]) -> Stat | None:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    array = np.array(values)
    std = float(array.std(ddof=1)) if len(values) > 1 else math.nan
    return Stat(float(array.mean()), std, len(values), float(array.min()), float(array.max()))


COUNTS = ("steps", "tokens", "params")  # the same in every seed, unless runs stopped early
QUANTITIES = (*COUNTS, "tokens_per_s", "wall_s")


def group_stats(group: Group, metrics: list[str]) -> dict[str, Stat | None]:
    """The group's quantities pooled over its runs, its metrics over its finished runs (a
    killed run's last evaluation is not a final one), or over all when none finished."""
    stats = {name: pool([getattr(row, name) for row in group.rows]) for name in QUANTITIES}
    scored = [row for row in group.rows if row.state == FINISHED_STATE] or group.rows
    for metric in metrics:
        stats[f"{metric}_final"] = pool([row.final.get(metric) for row in scored])
        stats[f"{metric}_best"] = pool([row.best.get(metric) for row in scored])
    return stats


STATE_ORDER = (FINISHED_STATE, RUNNING, INTERRUPTED, DIVERGED, NOT_STARTED)


def states(rows: list[RunRow]) -> str:
    counts = Counter(row.state for row in rows)
    return ", ".join(f"{counts[state]} {state}" for state in STATE_ORDER if counts[state])


# -- formatting -----------------------------------------------------------------------------------
def si(x: float) -> str:
    """12_300 -> 12.3k."""
    for scale, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"),
                          (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def duration(seconds: float, spread: float | None = None) -> str:
    """A time (and its spread) in one unit: seconds, minutes or hours."""
    scale, unit = (1, "s") if seconds < 120 else (60, "min") if seconds < 7200 else (3600, "h")
    text = f"{seconds / scale:.1f}" + ("" if spread is None else f" ± {spread / scale:.1f}")
    return f"{text} {unit}"


def number(x: float, spread: float | None = None) -> str:
    """A metric (and its spread, to the same decimals)."""
    fixed = 1e-3 <= abs(x) < 1e4 or x == 0 or math.isnan(x)
    fmt = "{:.4f}" if fixed else "{:.3e}"
    return fmt.format(x) + ("" if spread is None else " ± " + fmt.format(spread))


def show(stat: Stat | None, group_size: int, kind: str = "metric") -> str:
    if stat is None:
        return "—"
    spread = stat.std if stat.n > 1 else None
    if kind in COUNTS:  # equal across seeds: the value; else the range
        text = si(stat.mean) if stat.low == stat.high else f"{si(stat.low)}–{si(stat.high)}"
    elif kind == "tokens_per_s":
        text = si(stat.mean) + ("" if spread is None else f" ± {si(spread)}")
    elif kind == "wall_s":
        text = duration(stat.mean, spread)
    else:
        text = number(stat.mean, spread)
    return text + (f" (n={stat.n})" if stat.n < group_size else "")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def display(path: Path) -> str:
    """A run's path, relative to the working directory when under it."""
    path = Path(os.path.abspath(path))
    try:
        return str(path.relative_to(Path.cwd())) or "."
    except ValueError:
        return str(path)


# -- the comparison -------------------------------------------------------------------------------
@dataclass
class Comparison:
    paths: list[str]
    by: list[str]
    metric: str | None  # the plotted one (None: no run has a metric record)
    rows: list[RunRow]
    groups: list[Group]
    files: list[Path] = field(default_factory=list)  # what was written

    @property
    def eval_metrics(self) -> list[str]:
        """Every eval metric of the runs, the headline ones first."""
        names = list(dict.fromkeys(m for row in self.rows for m in row.final))
        return [m for m in HEADLINE if m in names] + [m for m in names if m not in HEADLINE]

    @property
    def incomplete(self) -> list[RunRow]:
        return [row for row in self.rows if row.problems]

    def table(self, metrics: list[str]) -> str:
        """Per group: the `by` keys, runs, states, the counts and the metrics' final and best."""
        header = [*(self.by or ["group"]), "n", "state", "steps", "tokens", "params", "tokens/s",
                  "wall"]
        header += [f"{m} {which}" for m in metrics for which in ("final", "best")]
        lines = []
        for group in self.groups:
            stats, size = group_stats(group, metrics), len(group.rows)
            line = [str(v) for v in group.values] if self.by else ["all runs"]
            line += [str(size), states(group.rows)]
            line += [show(stats[name], size, name) for name in QUANTITIES]
            line += [show(stats[f"{m}_{which}"], size) for m in metrics
                     for which in ("final", "best")]
            lines.append(line)
        return markdown_table(header, lines)

    def headline_table(self) -> str:
        metrics = [m for m in self.eval_metrics if m in HEADLINE] or self.eval_metrics
        return self.table(metrics)

    def incomplete_lines(self) -> list[str]:
        return [f"- {display(row.path)}: {'; '.join(row.problems)}" for row in self.incomplete]

    def report(self) -> str:
        """What the app prints."""
        runs, groups = len(self.rows), len(self.groups)
        lines = [f"{runs} run{'s' * (runs != 1)} in {groups} group{'s' * (groups != 1)}, by "
                 f"{', '.join(self.by) or 'nothing (one group)'}; seeds pooled: mean ± std",
                 "", self.headline_table()]
        if self.incomplete:
            lines += ["", f"incomplete runs ({len(self.incomplete)}):", *self.incomplete_lines()]
        if self.files:
            lines += ["", f"wrote {', '.join(display(path) for path in self.files)}"]
        return "\n".join(lines)

    # -- files ------------------------------------------------------------------------------------
    def markdown(self, plot: Path | None) -> str:
        ignored = differing_keys(self.rows, ignored=True)
        lines = [f"# Comparison of {len(self.rows)} runs", "",
                 f"Paths: {', '.join(self.paths)}", "",
                 f"Grouped by: {', '.join(self.by) or 'nothing (one group)'}. Seeds are pooled: "
                 "mean ± sample standard deviation over the group's runs (eval metrics: its "
                 "finished runs, if any); (n=K) marks a value fewer runs have.",
                 f"Differ too, not grouped by: {', '.join(ignored) or 'nothing'}.", "",
                 "## Groups", "", self.headline_table(), ""]
        if self.eval_metrics and len(self.eval_metrics) > len(
                [m for m in self.eval_metrics if m in HEADLINE]):
            lines += ["## Every eval metric", "", self.table(self.eval_metrics), ""]
        metric = self.metric[5:] if self.metric and self.metric.startswith("eval/") else None
        run_header = ["run", *(self.by or ["group"]), "seed", "state", "steps"]
        run_header += [f"{metric} final", f"{metric} best"] if metric else []
        run_lines = []
        for row in self.rows:
            line = [display(row.path)]
            line += [str(row.config.get(key, "?")) for key in self.by] if self.by else ["all runs"]
            line += [str(row.config.get("seed", "?")), row.state, str(row.steps)]
            if metric:
                line += [number(row.final[metric]) if metric in row.final else "—",
                         number(row.best[metric]) if metric in row.best else "—"]
            run_lines.append(line)
        lines += ["## Runs", "", markdown_table(run_header, run_lines), ""]
        lines += [f"## Incomplete runs ({len(self.incomplete)})", "",
                  *(self.incomplete_lines() or ["none"]), ""]
        if plot is not None:
            lines += [f"## {self.metric}", "", f"![{self.metric}]({plot.name})", ""]
        return "\n".join(lines)

    def write_csv(self, path: Path) -> None:
        metrics = self.eval_metrics
        names = [*QUANTITIES, *(f"{m}_{which}" for m in metrics for which in ("final", "best"))]
        with path.open("w", newline="") as file:
            writer = csv.writer(file)
            parts = [f"{name}_{part}" for name in names for part in ("mean", "std", "n")]
            writer.writerow([*(self.by or ["group"]), "runs", "states", *parts])
            for group in self.groups:
                stats = group_stats(group, metrics)
                line = list(group.values) if self.by else ["all runs"]
                line += [len(group.rows), states(group.rows)]
                for name in names:
                    stat = stats[name]
                    line += ["", "", 0] if stat is None else [stat.mean, stat.std, stat.n]
                writer.writerow(line)

    def write_runs_csv(self, path: Path) -> None:
        metrics = self.eval_metrics
        with path.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["path", *self.by, "seed", "state", "problems", "steps", "tokens",
                             "params", "tokens_per_s", "wall_s",
                             *(f"{m}_{which}" for m in metrics for which in ("final", "best"))])
            for row in self.rows:
                writer.writerow([
                    str(row.path), *(row.config.get(key, "") for key in self.by),
                    row.config.get("seed", ""), row.state, "; ".join(row.problems),
                    *("" if v is None else v for v in (row.steps, row.tokens, row.params,
                                                       row.tokens_per_s, row.wall_s)),
                    *(getattr(row, which).get(m, "") for m in metrics
                      for which in ("final", "best"))])

    def write(self, out: Path) -> list[Path]:
        try:
            out.mkdir(parents=True, exist_ok=True)
            plot = None
            if self.metric is not None:
                from jaxformer.analysis.plots import plot_metric

                plot = plot_metric(self, out / f"{self.metric.replace('/', '_')}.png")
            (out / "compare.md").write_text(self.markdown(plot))
            self.write_csv(out / "compare.csv")
            self.write_runs_csv(out / "runs.csv")
        except OSError as err:
            raise UserError(f"out={out} is not writable ({err.strerror}): choose another "
                            "out") from err
        self.files = [out / "compare.md", out / "compare.csv", out / "runs.csv"] + \
            ([plot] if plot else [])
        return self.files


def qualify_metric(name: str, recorded: Iterable[str], key: str = "metric",
                   whose: str = "these runs") -> str:
    """`loss` -> eval/loss (eval/NAME and train/NAME as they are), checked against the `recorded`
    metric names (in the records' order): one line naming `key` and the choices if absent."""
    available = sorted(dict.fromkeys(recorded), key=lambda m: not m.startswith("eval/"))
    qualified = name if name.startswith(("eval/", "train/")) else f"eval/{name}"
    if qualified not in available:
        choices = ", ".join(m.removeprefix("eval/") for m in available)
        raise UserError(f"{key}={name} is not a metric of {whose}: "
                        + (f"pick one of {choices} (bare names are eval metrics)" if choices
                           else "no metric records"))
    return qualified


def resolve_metric(name: str | None, rows: list[RunRow]) -> str | None:
    """`loss` -> eval/loss; checked against the metrics the runs recorded (None: the default)."""
    seen = [m for row in rows for m in row.curves]
    if name is None:
        return next((m for m in DEFAULT_METRICS if m in seen), None)
    return qualify_metric(name, seen)


def read_runs(paths: list[str]) -> list[RunRow]:
    runs = {Path(os.path.abspath(run.path)): run for path in paths for run in find_runs(path)}
    return [read_run(run) for run in runs.values()]


def compare(config: CompareConfig, write: bool = True) -> Comparison:
    rows = read_runs(config.paths)
    by = differing_keys(rows) if config.by is None else check_by(config.by, rows)
    comparison = Comparison(list(config.paths), by, resolve_metric(config.metric, rows), rows,
                            group_rows(rows, by))
    if write:
        comparison.write(config.output_dir)
    return comparison

