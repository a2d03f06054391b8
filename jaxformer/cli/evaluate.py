"""`python -m jaxformer.evaluate checkpoint=RUN_DIR [sampling.num_samples=16 sampling.temperature=0.8]`:
test-time compute on a trained run's held-out problems; jaxformer/inference/test_time.py says what
it writes where. With `text=FILE_OR_GLOB`: the bits per byte of that text under a decoder run,
overall and per file (jaxformer/inference/scoring.py).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from jaxformer.cli.app import CONF_PATH, quiet_libraries, register_schema, run_app, user_errors
from jaxformer.config import to_config
from jaxformer.inference.scoring import score_files
from jaxformer.inference.test_time import EvaluateConfig, Evaluation, evaluate_run

quiet_libraries()
register_schema("evaluate_schema", EvaluateConfig)


def to_evaluate_config(cfg: DictConfig) -> EvaluateConfig:
    return to_config(cfg, EvaluateConfig, "python -m jaxformer.evaluate checkpoint=RUN_DIR")


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


def report_text(scores: dict, out_dir) -> None:
    print(f"{len(scores['documents'])} documents, {scores['tokens']} tokens, {scores['bytes']} "
          f"bytes, step {scores['step']}: {scores['bpb']:.4f} bits per byte")
    for doc in scores["documents"]:
        print(f"  {doc['bpb']:8.4f}  {doc['bytes']:9d} bytes  {doc['path']}")
    print(f"scores: {out_dir / 'text_scores.json'}")


@hydra.main(version_base=None, config_path=CONF_PATH, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with user_errors():
        config = to_evaluate_config(cfg)
        if config.text is not None:
            report_text(score_files(config.checkpoint, config.text, config.step,
                                    config.output_dir), config.output_dir)
        else:
            report(evaluate_run(config))


def launch() -> None:
    run_app(main, "evaluate", to_evaluate_config)


if __name__ == "__main__":
    launch()
