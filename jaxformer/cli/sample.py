"""`python -m jaxformer.sample checkpoint=RUN_DIR prompt=12+34= [sampling.temperature=0.8 ...]`:
completions of a trained run's model, each with its log-probability under the model (see
jaxformer/inference/sampling.py). `prompt` is free text: it reaches the app verbatim
(`prompt=12+34=`, `prompt=007` need no quotes).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from jaxformer.cli.app import CONF_PATH, quiet_libraries, register_schema, run_app, user_errors
from jaxformer.config import to_config
from jaxformer.inference.sampling import SampleConfig, Sampled, sample_run
from jaxformer.runs import RunDir

FREE_TEXT_KEYS = ("prompt",)
quiet_libraries()
register_schema("sample_schema", SampleConfig)


def to_sample_config(cfg: DictConfig) -> SampleConfig:
    return to_config(cfg, SampleConfig, "python -m jaxformer.sample checkpoint=RUN_DIR prompt=TEXT")


def report(config: SampleConfig, sampled: Sampled, title: str) -> None:
    print(f"{title} from {config.checkpoint} ({sampled.kind}, step {sampled.step}), "
          f"prompt {config.prompt!r}:")
    print(f"  {'logprob':>9}  {'tokens':>6}  completion")
    for text, logprob, length, ended in zip(sampled.texts, sampled.logprobs, sampled.lengths,
                                            sampled.ended):
        print(f"  {logprob:9.4f}  {length:6d}  {text!r}" + ("" if ended else "  (no <eos>)"))


@hydra.main(version_base=None, config_path=CONF_PATH, config_name="sample")
def main(cfg: DictConfig) -> None:
    with user_errors():
        config = to_sample_config(cfg)
        s = config.sampling
        run = RunDir.open(config.checkpoint).restore(config.step)  # once, for samples and beams
        report(config, sample_run(config, run=run),
               f"{s.num_samples} samples (temperature {s.temperature:g}, top_k {s.top_k}, "
               f"top_p {s.top_p:g}, seed {s.seed})")
        if s.beam_size:
            report(config, sample_run(config, beams=True, run=run),
                   f"{s.beam_size} beams (length_penalty {s.length_penalty:g})")


def launch() -> None:
    run_app(main, "sample", to_sample_config, free_text_keys=FREE_TEXT_KEYS)


if __name__ == "__main__":
    launch()
