"""`python -m jaxformer.train [overrides]`: the Hydra training entry point over `conf/train.yaml`.

Re-running with the same `hydra.run.dir` resumes from its latest checkpoint. The job returns the
run's score (`score.metric`, jaxformer/analysis/score.py) for a sweeper that optimises it
(`hydra/sweeper: optuna`; conf/experiment/search_lr_wd.yaml), None when no score is configured.
"""

from __future__ import annotations

import logging
import sys
from enum import Enum

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from jaxformer.cli.app import CONF_PATH, quiet_libraries, run_app, user_errors
from jaxformer.config import register_configs, to_train_config
from jaxformer.errors import UserError

register_configs()
quiet_libraries(logging.WARNING)  # their warnings belong in train.log


def report(result, config, score: float | None) -> None:
    if result.already_finished:
        print(f"{result.run_dir} already holds a finished run ({result.step} steps): nothing to do")
    print()
    width = max((len(prompt + completion) for prompt, completion, *_ in result.samples), default=0)
    for prompt, completion, expected, correct in result.samples:
        mark = "ok " if correct else "BAD"
        print(f"  [{mark}] {prompt + completion:<{width}}  (expected {expected})")
    metrics = result.eval_metrics
    if not metrics:
        print(f"\ntrained {result.step} steps ({result.objective}); no evaluation "
              "(trainer.eval_every=0)")
    elif "exact_match" in metrics:
        by_digits = ", ".join(
            f"{key.removeprefix('exact_match_')}: {value:.1%}"
            for key, value in metrics.items() if key.startswith("exact_match_")
        )
        print(f"\nheld-out greedy exact match after {result.step} steps ({result.objective}): "
              f"{metrics['exact_match']:.1%} ({by_digits}); "
              f"eval loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.1%}")
    elif "bpb" in metrics:  # text: bits per byte compare across tokenizers
        print(f"\nheld-out after {result.step} steps ({result.objective}): "
              f"{metrics['bpb']:.4f} bits per byte (on the same bytes: unigram model of the "
              f"training tokens {metrics['unigram_bpb']:.4f}, zlib -9 {metrics['zlib_bpb']:.4f}); "
              f"eval loss {metrics['loss']:.4f} (perplexity {metrics['perplexity']:.2f}), "
              f"next-token accuracy {metrics['accuracy']:.1%}")
    else:  # vector tasks: no text answers
        print(f"\nheld-out after {result.step} steps ({result.objective}): "
              f"eval loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.1%}")
    if score is not None:
        print(f"score:    {score:.6g} ({config.score.reduce} {config.score.metric}, "
              f"{config.score.mode}imised by a search)")
    print(f"run dir:  {result.run_dir}")
    print(f"metrics:  {result.metrics_path}")
    print(f"wandb:    {result.wandb_dir or 'disabled'}"
          + ("  (sync with: wandb sync " + result.wandb_dir + ")" if result.wandb_dir else ""))


DIRECTIONS = {"minimize": "min", "maximize": "max"}  # a sweeper's direction -> score.mode


def check_sweeper(sweeper: DictConfig, cfg: DictConfig) -> None:
    """A sweeper that optimises what the job returns (one with a `direction`: hydra/sweeper=
    optuna) needs a score (score.metric) that improves the way it optimises."""
    direction = sweeper.get("direction")
    if direction is None:
        return  # the basic and grids sweepers run every job, whatever it returns
    direction = direction.name if isinstance(direction, Enum) else str(direction)
    if direction not in DIRECTIONS:
        raise UserError(f"hydra.sweeper.direction={direction}: python -m jaxformer.train returns "
                        "one score, so the direction is minimize or maximize")
    if cfg.score.metric is None:
        raise UserError(f"hydra.sweeper {direction}s what each job returns, but score.metric is "
                        f"null: name the metric (e.g. score.metric=bpb score.mode="
                        f"{DIRECTIONS[direction]})")
    if DIRECTIONS[direction] != cfg.score.mode:
        raise UserError(f"hydra.sweeper.direction={direction} but score.mode={cfg.score.mode}: "
                        f"set score.mode={DIRECTIONS[direction]} (or the direction the other way)")


@hydra.main(version_base=None, config_path=CONF_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    # after config checks: importing jax is slow
    from jaxformer.analysis.score import run_score, worst_score
    from jaxformer.parallel import is_main_process
    from jaxformer.runs import RunDir
    from jaxformer.training.loop import train
    from jaxformer.training.preemption import Preempted

    hydra_cfg = HydraConfig.get()
    with user_errors():
        try:
            config = to_train_config(cfg)
            job_name = (hydra_cfg.job.override_dirname or config.name)[:128]
            result = train(config, hydra_cfg.runtime.output_dir, job_name=job_name)
        except FloatingPointError as err:
            if hydra_cfg.mode != RunMode.MULTIRUN:
                raise UserError(str(err)) from err
            print(f"error: {err}", file=sys.stderr)
            # a diverged job is a result of a sweep, not its end (and a search's worst trial)
            return worst_score(config.score) if config.score.metric is not None else None
        except Preempted as stop:  # a checkpoint was written: a clean stop, not a crash
            print(stop, file=sys.stderr)
            sys.exit(stop.exit_code)
        if not is_main_process():
            return None  # process 0 reports (and scores) a multi-host run
        score = None
        if config.score.metric is not None:
            score = run_score(RunDir(result.run_dir).metrics(), config.score)
    report(result, config, score)
    return score


def launch() -> None:
    run_app(main, "train", to_train_config, sweeps=True, check_sweeper=check_sweeper)


if __name__ == "__main__":
    launch()
