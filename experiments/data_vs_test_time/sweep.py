"""Study B's sweep as data: its training runs (D, seed, parameters, training tokens) and each
run's evaluations (summary.json + samples.jsonl of `python -m jaxformer.evaluate`), averaged over
seeds per training-set size D."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tradeoff import sample_flops, train_flops

from jaxformer.errors import UserError
from jaxformer.runs import RunDir, find_runs
from jaxformer.inference.selection import answer_ids

STRATEGIES = {  # summary.json prefix -> name; verifier_eps0 equals pass@k exactly, so it is left out
    "pass": "pass@k (exact verifier)",
    "majority": "majority@k",
    "best_logprob": "best-of-k by log-prob",
    "verifier_eps0.01": "verifier, 1% false positives",
    "verifier_eps0.05": "verifier, 5% false positives",
}


# -- loading --------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    setting: str  # the settings key without its step, e.g. T1-k0-p1-n128-seed0
    label: str  # e.g. "T=1, top-p 0.9"
    summary: dict
    correct: np.ndarray  # (P, n) bool
    ids: np.ndarray  # (P, n) answer ids, equal within a problem for equal answers
    greedy_correct: np.ndarray  # (P,) bool
    difficulty: np.ndarray  # (P,) operand digits
    prompt_tokens: float  # mean per problem, <bos> included
    sample_tokens: float  # mean per sample, <eos> included
    greedy_tokens: float

    @property
    def ks(self) -> list[int]:
        return sorted(int(key.split("@")[1]) for key in self.summary if key.startswith("pass@"))

    def curve(self, strategy: str) -> np.ndarray:
        return np.array([self.summary[f"{strategy}@{k}"] for k in self.ks])


@dataclass
class Run:
    path: Path
    train_size: int
    seed: int
    n_params: int
    train_tokens: int  # steps x batch x sequence width: every token the training steps processed
    train_exact_match: float | None  # the training loop's own final greedy evaluation
    wandb_id: str | None
    evaluations: dict[str, Evaluation] = field(default_factory=dict)

    @property
    def train_flops(self) -> float:
        return train_flops(self.n_params, self.train_tokens)


def setting_label(summary: dict) -> str:
    label = f"T={summary['temperature']:g}"
    if summary["top_k"]:
        label += f", top-k {summary['top_k']}"
    if summary["top_p"] < 1:
        label += f", top-p {summary['top_p']:g}"
    return label


def load_evaluation(directory: Path) -> Evaluation:
    summary = json.loads((directory / "summary.json").read_text())
    lines = (directory / "samples.jsonl").read_text().splitlines()[: summary["problems"]]
    records = [json.loads(line) for line in lines]
    samples = [record["samples"] for record in records]
    return Evaluation(
        summary["settings"].split("-", 1)[1], setting_label(summary), summary,
        np.array([[s["correct"] for s in row] for row in samples], bool),
        answer_ids([[s["answer"] for s in row] for row in samples]),
        np.array([r["greedy"]["correct"] for r in records], bool),
        np.array([r["difficulty"] for r in records], int),
        float(np.mean([len(r["prompt"]) + 1 for r in records])),
        float(np.mean([s["tokens"] for row in samples for s in row])),
        float(np.mean([r["greedy"]["tokens"] for r in records])))


def load_run(run_dir: RunDir) -> Run:
    cfg = run_dir.config
    if cfg.task.train_size is None:
        raise UserError(f"{run_dir.path} trained with task.train_size=null (fresh problems every "
                        "step): Study B needs a training set of D unique problems")
    width = run_dir.objective.max_positions(run_dir.task)
    final = [r for r in run_dir.metrics("eval") if "exact_match" in r]
    run = Run(run_dir.path, cfg.task.train_size, cfg.seed, run_dir.n_params,
              cfg.trainer.steps * cfg.trainer.batch_size * width,
              final[-1]["exact_match"] if final else None, run_dir.wandb_id)
    for summary in sorted(run_dir.path.glob("test_time/*/summary.json")):
        evaluation = load_evaluation(summary.parent)
        run.evaluations[evaluation.setting] = evaluation
    return run


def load_sweep(sweep_dir: Path) -> list[Run]:
    if not sweep_dir.is_dir():
        raise UserError(f"{sweep_dir} is not a directory: pass the sweep dir of run.py "
                        "(e.g. multirun/data_vs_test_time_cpu/sweep)")
    run_dirs = find_runs(sweep_dir)
    if not run_dirs:
        raise UserError(f"{sweep_dir} holds no training runs (*/.hydra/config.yaml): pass the "
                        "sweep dir of run.py (e.g. multirun/data_vs_test_time_cpu/sweep)")
    runs = [run for run in map(load_run, run_dirs) if run.evaluations]
    if not runs:
        raise UserError(f"no run in {sweep_dir} has an evaluation (test_time/*/summary.json): "
                        "run experiments/data_vs_test_time/run.py first")
    return sorted(runs, key=lambda r: (r.train_size, r.seed))


# -- aggregation over seeds -----------------------------------------------------------------------
def common_settings(runs: list[Run]) -> list[str]:
    settings = set.intersection(*(set(run.evaluations) for run in runs))
    if not settings:
        raise UserError("no sampling setting was evaluated for every run: finish run.py")
    return sorted(settings)


def pick_setting(settings: list[str], wanted: str) -> str:
    matches = [s for s in settings if s == wanted or s.startswith(wanted + "-")]
    if not matches:
        raise UserError(f"--setting {wanted} matches none of the evaluated settings: "
                        f"{', '.join(settings)}")
    return max(matches, key=lambda s: int(s.split("-n")[1].split("-")[0]))  # the most samples


def by_size(runs: list[Run]) -> dict[int, list[Run]]:
    groups: dict[int, list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.train_size].append(run)
    return dict(sorted(groups.items()))


def mean_curves(groups: dict[int, list[Run]], setting: str, strategy: str) -> dict[int, tuple]:
    """{D: (ks, accuracy averaged over seeds)}."""
    return {d: (members[0].evaluations[setting].ks,
                np.mean([r.evaluations[setting].curve(strategy) for r in members], axis=0))
            for d, members in groups.items()}


def seed_range(groups: dict[int, list[Run]], setting: str, strategy: str) -> dict[int, tuple]:
    """{D: (lowest, highest) accuracy over the seeds at each k}."""
    curves = {d: np.array([r.evaluations[setting].curve(strategy) for r in members])
              for d, members in groups.items()}
    return {d: (c.min(axis=0), c.max(axis=0)) for d, c in curves.items()}


def mean_over(members: list[Run], value) -> float:
    return float(np.mean([value(run) for run in members]))



def inference_flops(members: list[Run], setting: str, k: float, greedy: bool = False) -> float:
    """Mean inference FLOPs per problem of `members` answering with k samples (or greedily)."""
    return mean_over(members, lambda run: sample_flops(
        run.n_params, run.evaluations[setting].prompt_tokens,
        run.evaluations[setting].greedy_tokens if greedy else run.evaluations[setting].sample_tokens,
        1 if greedy else k))


