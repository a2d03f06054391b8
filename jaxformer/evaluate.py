"""`python -m jaxformer.evaluate checkpoint=RUN_DIR [sampling.num_samples=16 sampling.temperature=0.8]`:
test-time compute on a trained run's held-out problems.

The task is rebuilt from the run's own config (`.hydra/config.yaml`), so the held-out split is the
one training never saw. For every problem: the greedy answer, `sampling.num_samples` sampled answers
(and the top beam when `sampling.beam_size > 0`), each with its correctness and log-probability.

Outputs, under OUT (`out_dir`, default the run dir), keyed by the settings that change the samples
(KEY, e.g. `step1500-T0.8-k0-p0.9-n16-seed0`):
  OUT/test_time/KEY/samples.jsonl   one JSON object per problem, in held-out order:
      {"problem": i, "prompt", "expected", "difficulty",
       "greedy": ANSWER, "beam": ANSWER (with beam search), "samples": [ANSWER, ...]}
      ANSWER = {"answer": text up to <eos>, "correct": bool, "logprob": float (the model's,
                unwarped, <eos> included), "tokens": int (<eos> included), "eos": bool}
  OUT/test_time/KEY/summary.json    settings + metrics (jaxformer/selection.py for their meaning):
      greedy_accuracy, sample_accuracy, pass@k, majority@k, best_logprob@k, verifier_eps{eps}@k
      for k = 1, 2, 4, ... n (and beam_accuracy with beam search)
  OUT/metrics.jsonl                 the same summary as one record, split "test_time" (a rerun with
                                    the same KEY replaces it); and an offline wandb run in KEY/.
Sample j of problem i draws from fold_in(fold_in(key(seed), i), j): results do not depend on the
batch size, and an interrupted evaluation resumes where samples.jsonl ends.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from jaxformer.cli import preflight, typed_config
from jaxformer.config import ConfigError, LoggerConfig, SamplingConfig, register_configs, to_dict
from jaxformer.restore import checkpoints_dir
from jaxformer.test_time import TestTimeRun

for noisy in ("absl", "orbax", "jax"):
    logging.getLogger(noisy).setLevel(logging.ERROR)
register_configs()


@dataclass
class EvaluateConfig:
    checkpoint: str = MISSING  # a run dir written by `python -m jaxformer.train`
    step: Optional[int] = None  # checkpoint step; None: the latest
    out_dir: Optional[str] = None  # None: the run dir
    num_problems: Optional[int] = None  # the first N held-out problems; None: all of them
    verifier_eps: list[float] = field(default_factory=lambda: [0.0, 0.01, 0.05])
    majority_resamples: int = 1000  # k-subsets drawn per problem to estimate majority@k
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def __post_init__(self) -> None:
        if self.step is not None and self.step < 0:
            raise ConfigError(f"step={self.step} must be >= 0 (or null for the latest checkpoint)")
        if self.num_problems is not None and self.num_problems < 1:
            raise ConfigError(f"num_problems={self.num_problems} must be >= 1 (or null for all)")
        if self.majority_resamples < 1:
            raise ConfigError(f"majority_resamples={self.majority_resamples} must be >= 1")
        for eps in self.verifier_eps:
            if not 0.0 <= eps <= 1.0:
                raise ConfigError(f"verifier_eps holds {eps}: a false-positive rate is in [0, 1]")
        checkpoints_dir(Path(self.checkpoint))

    @property
    def output_dir(self) -> Path:
        return Path(self.out_dir or self.checkpoint)


ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


def to_evaluate_config(cfg: DictConfig) -> EvaluateConfig:
    return typed_config(cfg, "python -m jaxformer.evaluate checkpoint=RUN_DIR")


def settings_key(step: int, sampling: SamplingConfig, max_new_tokens: Optional[int]) -> str:
    """The name of one evaluation: every setting that changes the samples."""
    key = (f"step{step}-T{sampling.temperature:g}-k{sampling.top_k}-p{sampling.top_p:g}"
           f"-n{sampling.num_samples}-seed{sampling.seed}")
    if max_new_tokens is not None:
        key += f"-new{max_new_tokens}"
    if sampling.beam_size:
        key += f"-beam{sampling.beam_size}-lp{sampling.length_penalty:g}"
    return key


class Evaluation(NamedTuple):
    directory: Path  # OUT/test_time/KEY
    summary: dict  # settings + metrics, as summary.json holds them


def evaluate_run(config: EvaluateConfig) -> Evaluation:
    """Sample (or resume sampling) the held-out problems, then score every selection strategy."""
    run = TestTimeRun.restore(config)
    key = settings_key(run.step, config.sampling, config.sampling.max_new_tokens)
    directory = config.output_dir / "test_time" / key
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"out_dir={config.output_dir} is not writable ({err.strerror}): "
                          "choose another out_dir") from None
    records = run.sample_problems(directory / "samples.jsonl")
    summary = {"checkpoint": str(Path(config.checkpoint).absolute()), "step": run.step,
               "settings": key, "problems": len(records), **to_dict(config.sampling),
               "max_new_tokens": run.max_new_tokens, **run.score(records)}
    (directory / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    run.log(summary, directory)
    return Evaluation(directory, summary)


def report(evaluation: Evaluation) -> None:
    summary = evaluation.summary
    n = summary["num_samples"]
    print(f"{summary['problems']} held-out problems, step {summary['step']}, {summary['settings']}")
    print(f"  greedy accuracy {summary['greedy_accuracy']:.3f}; sample accuracy "
          f"{summary['sample_accuracy']:.3f}" + (f"; top beam {summary['beam_accuracy']:.3f}"
                                                  if "beam_accuracy" in summary else ""))
    print(f"  at k={n}: pass {summary[f'pass@{n}']:.3f}, majority {summary[f'majority@{n}']:.3f}, "
          f"best log-prob {summary[f'best_logprob@{n}']:.3f}, " + ", ".join(
              f"verifier eps={key.split('@')[0].removeprefix('verifier_eps')} {value:.3f}"
              for key, value in summary.items()
              if key.startswith("verifier_eps") and key.endswith(f"@{n}")))
    print(f"samples: {evaluation.directory / 'samples.jsonl'}")
    print(f"summary: {evaluation.directory / 'summary.json'}")


@hydra.main(version_base=None, config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        report(evaluate_run(to_evaluate_config(cfg)))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    preflight(sys.argv[1:], "evaluate", to_evaluate_config)
    main()
