"""Study B end to end: train the grid of training-set sizes x seeds, evaluate every trained run at
every sampling setting, then write the report.

    python experiments/data_vs_test_time/run.py [EXPERIMENT] [TRAIN_OVERRIDES ...]
        [--evaluate "OVERRIDES"]... [--no-analysis] [--out DIR] [--dry-run]

EXPERIMENT is a conf/experiment/ file with a fixed `hydra.sweep.dir` (data_vs_test_time_cpu by
default; data_vs_test_time is the full grid). Three stages, each resumable, run from the directory
the sweep dir is relative to (the repository root):

1. Training: `python -m jaxformer.train -m experiment=EXPERIMENT TRAIN_OVERRIDES`, launched only if
   some job of the grid has not finished (its metrics.jsonl holds no final summary record). The
   sweep dir is fixed and each job's dir is named by its overrides, so a relaunch finds the same
   dirs: unfinished jobs resume from their last checkpoint, finished ones restore and stop.
2. Evaluation: for every run dir and every line of evaluations.yaml under EXPERIMENT (or each
   --evaluate), what `python -m jaxformer.evaluate checkpoint=RUN_DIR LINE` does, in this process
   (one JAX start-up, programs compiled once for all runs). An evaluation whose summary.json
   exists is skipped; an interrupted one resumes where its samples.jsonl ends.
3. Analysis: `python experiments/data_vs_test_time/analyze.py SWEEP_DIR [--out DIR]`.

Every stage prints what it runs or skips and its wall time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

from jaxformer.cli.app import CONF_DIR
from jaxformer.config import register_configs, to_train_config
from jaxformer.errors import UserError
from jaxformer.runs import RunDir

HERE = Path(__file__).resolve().parent
EVALUATIONS = HERE / "evaluations.yaml"
DEFAULT_EXPERIMENT = "data_vs_test_time_cpu"


@dataclass
class Job:
    overrides: list[str]  # the job's own overrides, as the sweep passes them
    run_dir: Path
    steps: int

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def finished(self) -> bool:
        """The run reached its steps: the loop's summary record (written after the last
        checkpoint) is in its metrics."""
        return any(record.get("step", 0) >= self.steps
                   for record in RunDir(self.run_dir).metrics("summary"))


def compose_config(config_name: str, overrides: list[str], hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=hydra)


def sweep_overrides(experiment: str, overrides: list[str]) -> list[list[str]]:
    """The overrides of each job `python -m jaxformer.train -m experiment=EXPERIMENT OVERRIDES`
    runs: the experiment's hydra.sweeper.params, then the command line, as Hydra's basic sweeper."""
    fixed = [o.input_line for o in OverridesParser.create().parse_overrides(overrides)
             if not o.is_sweep_override()]
    base = compose_config("train", [f"experiment={experiment}", *fixed], hydra=True)
    sweeper = base.hydra.sweeper
    if not sweeper._target_.endswith("BasicSweeper"):
        raise UserError(f"experiment={experiment} uses {sweeper._target_}: run.py expands "
                        "Hydra's basic sweeper (hydra.sweeper.params) only")
    if "${now:" in OmegaConf.to_yaml(base.hydra.sweep, resolve=False):
        raise UserError(f"experiment={experiment} has a timestamped hydra.sweep.dir: fix it "
                        "(e.g. multirun/${name}/sweep) so a relaunch finds the same runs")
    params = [f"{key}={value}" for key, value in (sweeper.params or {}).items()]
    parsed = OverridesParser.create().parse_overrides(params + overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def sweep_jobs(experiment: str, overrides: list[str]) -> list[Job]:
    """The sweep's jobs with their run dirs (hydra.sweep.dir / hydra.sweep.subdir)."""
    jobs = []
    for job in sweep_overrides(experiment, overrides):
        cfg = compose_config("train", [f"experiment={experiment}", *job], hydra=True)
        run_dir = Path(cfg.hydra.sweep.dir) / str(cfg.hydra.sweep.subdir)
        with open_dict(cfg):
            del cfg["hydra"]  # the job's own config, as the app receives it
        jobs.append(Job(job, run_dir, to_train_config(cfg).trainer.steps))
    if len({job.run_dir for job in jobs}) < len(jobs):
        raise UserError(f"experiment={experiment} gives several jobs the same dir: name "
                        "hydra.sweep.subdir by every swept key (e.g. D${task.train_size}-seed${seed})")
    return jobs


def evaluation_lines(experiment: str, given: list[str] | None) -> list[str]:
    if given:
        return given
    table = OmegaConf.to_container(OmegaConf.load(EVALUATIONS))
    if experiment not in table:
        raise UserError(f"{EVALUATIONS} has no evaluations for experiment={experiment}: add a "
                        f"list under '{experiment}:' or pass --evaluate \"OVERRIDES\"")
    return list(table[experiment])


def train(experiment: str, overrides: list[str], jobs: list[Job], dry_run: bool) -> None:
    todo = [job.name for job in jobs if not job.finished]
    if not todo:
        print(f"[train] all {len(jobs)} runs finished: nothing to train")
        return
    command = [sys.executable, "-m", "jaxformer.train", "-m", f"experiment={experiment}", *overrides]
    print(f"[train] {len(todo)} of {len(jobs)} runs to train or resume ({', '.join(todo)}); "
          f"finished ones only restore and stop\n[train] $ python {' '.join(command[1:])}", flush=True)
    if dry_run:
        return
    start = time.perf_counter()
    if subprocess.run(command).returncode:
        raise SystemExit("error: the training sweep failed (its output is above); relaunch this "
                         "command to resume it")
    print(f"[train] done in {time.perf_counter() - start:.0f} s", flush=True)


def evaluate(jobs: list[Job], lines: list[str], dry_run: bool) -> None:
    from jaxformer.cli.evaluate import report, to_evaluate_config
    from jaxformer.inference.test_time import evaluate_run, settings_key

    total, start = len(jobs) * len(lines), time.perf_counter()
    for i, (job, line) in enumerate(((job, line) for job in jobs for line in lines), 1):
        if dry_run and not job.finished:  # nothing to read its checkpoint step from yet
            print(f"[evaluate {i}/{total}] {job.name}, once trained\n"
                  f"  $ python -m jaxformer.evaluate checkpoint={job.run_dir} {line}")
            continue
        config = to_evaluate_config(compose_config("evaluate", [f"checkpoint={job.run_dir}",
                                                                *line.split()]))
        key = settings_key(config.step if config.step is not None else job.steps, config.sampling,
                           config.sampling.max_new_tokens)
        summary = config.output_dir / "test_time" / key / "summary.json"
        head = f"[evaluate {i}/{total}] {job.name} {key}"
        if summary.exists():
            print(f"{head}: done before, skipped", flush=True)
            continue
        print(f"{head}\n  $ python -m jaxformer.evaluate checkpoint={job.run_dir} {line}", flush=True)
        if dry_run:
            continue
        began = time.perf_counter()
        report(evaluate_run(config))
        print(f"  ({time.perf_counter() - began:.0f} s)", flush=True)
    print(f"[evaluate] done in {time.perf_counter() - start:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", nargs="?", default=DEFAULT_EXPERIMENT)
    parser.add_argument("overrides", nargs="*", help="training overrides, as for jaxformer.train -m")
    parser.add_argument("--evaluate", action="append", metavar="OVERRIDES",
                        help="one evaluation's overrides (repeatable); default: evaluations.yaml")
    parser.add_argument("--no-analysis", action="store_true")
    parser.add_argument("--out", help="the analysis' output folder (default: its results/)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    args = parser.parse_args(argv)
    register_configs()
    try:
        jobs = sweep_jobs(args.experiment, args.overrides)
        lines = evaluation_lines(args.experiment, args.evaluate)
        train(args.experiment, args.overrides, jobs, args.dry_run)
        unfinished = [job.name for job in jobs if not job.finished]
        if unfinished and not args.dry_run:
            raise UserError(f"runs {', '.join(unfinished)} did not finish: relaunch to resume them")
        evaluate(jobs, lines, args.dry_run)
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    if args.no_analysis or args.dry_run:
        return
    command = [sys.executable, str(HERE / "analyze.py"), str(jobs[0].run_dir.parent)]
    command += ["--out", args.out] if args.out else []
    print(f"[analyse] $ python {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    if subprocess.run(command, env=os.environ).returncode:
        raise SystemExit("error: the analysis failed (its output is above)")
    print(f"[analyse] done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
