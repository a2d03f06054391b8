"""`python -m jaxformer.train [overrides]`: the Hydra training entry point over `conf/train.yaml`.

Re-running with the same `hydra.run.dir` resumes from its latest checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from jaxformer.config import ConfigError, register_configs, to_train_config

register_configs()

# Hydra's job logging turns the root logger to INFO; orbax/absl chatter belongs in train.log only.
for noisy in ("absl", "orbax", "jax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def report(result) -> None:
    print()
    for prompt, completion, expected, correct in result.samples:
        mark = "ok " if correct else "BAD"
        print(f"  [{mark}] {prompt}{completion:<8} (expected {expected})")
    metrics = result.eval_metrics
    by_digits = ", ".join(
        f"{key.removeprefix('exact_match_')}: {value:.1%}"
        for key, value in metrics.items() if key.startswith("exact_match_")
    )
    print(f"\nheld-out greedy exact match after {result.step} steps: "
          f"{metrics['exact_match']:.1%} ({by_digits})")
    print(f"run dir:  {result.run_dir}")
    print(f"metrics:  {result.metrics_path}")
    print(f"wandb:    {result.wandb_dir or 'disabled'}"
          + ("  (sync with: wandb sync " + result.wandb_dir + ")" if result.wandb_dir else ""))


def check_output_dir_args(argv: list[str]) -> None:
    """Hydra creates the run dir before `main` runs, and fails on a bad one with a traceback;
    check `hydra.run.dir` / `hydra.sweep.dir` overrides first so the user gets one line."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key not in ("hydra.run.dir", "hydra.sweep.dir") or not value:
            continue
        path = Path(value.split("${")[0] or ".").absolute()
        while not path.exists():
            path = path.parent
        if not path.is_dir() or not os.access(path, os.W_OK):
            sys.exit(f"error: {key}={value} is not writable ({path} is not a writable directory): "
                     "choose another directory")


@hydra.main(version_base=None, config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from jaxformer.training.loop import train  # after config checks: importing jax is slow

    try:
        config = to_train_config(cfg)
        hydra_cfg = HydraConfig.get()
        job_name = (hydra_cfg.job.override_dirname or config.name)[:128]
        result = train(config, hydra_cfg.runtime.output_dir, job_name=job_name)
    except (ConfigError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    report(result)
    return result.eval_metrics["exact_match"]


if __name__ == "__main__":
    check_output_dir_args(sys.argv[1:])
    main()
