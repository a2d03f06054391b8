"""`python -m jaxformer.sample checkpoint=RUN_DIR prompt=12+34= [sampling.temperature=0.8 ...]`:
completions of a trained run's model, each with its log-probability under the model.

The prompt is framed as training framed it: a decoder continues `<bos> prompt`, an encoder-decoder
decodes a target after `<bos>` from the source `prompt <eos>`. Completions stop at `<eos>` or after
`sampling.max_new_tokens` (default: whatever the context window leaves). The log-probability is the
model's own (unwarped) over the completion's tokens, `<eos>` included. `prompt` is free text: it
reaches the app verbatim (`prompt=12+34=`, `prompt=007` need no quotes).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import hydra
import jax
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from jaxformer.cli import preflight, quote_free_text, typed_config
from jaxformer.config import ConfigError, SamplingConfig, register_configs
from jaxformer.evaluation import completion_texts, ended_at_eos
from jaxformer.restore import checkpoints_dir, encode_text, require_generative, restore_params
from jaxformer.sampling import bos_prompts, generate

for noisy in ("absl", "orbax", "jax"):
    logging.getLogger(noisy).setLevel(logging.ERROR)

FREE_TEXT_KEYS = ("prompt",)
register_configs()


@dataclass
class SampleConfig:
    checkpoint: str = MISSING  # a run dir written by `python -m jaxformer.train`
    prompt: str = MISSING  # free text: the decoder's prompt, the encoder-decoder's source
    step: Optional[int] = None  # checkpoint step; None: the latest
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ConfigError("prompt is empty: pass the text to complete, e.g. prompt=12+34=")
        if self.step is not None and self.step < 0:
            raise ConfigError(f"step={self.step} must be >= 0 (or null for the latest checkpoint)")
        checkpoints_dir(Path(self.checkpoint))


ConfigStore.instance().store(name="sample_schema", node=SampleConfig)


def to_sample_config(cfg: DictConfig) -> SampleConfig:
    return typed_config(cfg, "python -m jaxformer.sample checkpoint=RUN_DIR prompt=TEXT")


class Sampled(NamedTuple):
    kind: str  # the model family
    step: int  # the checkpoint step
    texts: list[str]  # completions (samples, or beams best first)
    logprobs: list[float]
    lengths: list[int]  # tokens, <eos> included
    ended: list[bool]  # stopped at <eos> (else at max_new_tokens)


def sample_run(config: SampleConfig, beams: bool = False) -> Sampled:
    """Restore the run and complete the prompt (with beam search when `beams`)."""
    run = restore_params(config.checkpoint, config.step)
    require_generative(run.model_cfg, config.checkpoint, "sample")
    cfg = config.sampling
    cfg.check_vocab(run.model_cfg.vocab_size)
    max_len = run.model_cfg.max_len
    if run.model_cfg.kind == "encoder_decoder":
        src = encode_text(run.tokenizer, config.prompt, "prompt", bos=False, eos=True,
                          max_len=max_len)
        (prompt_ids,), _ = bos_prompts(1)
        source = (np.asarray([src]), np.ones((1, len(src)), np.int32))
    else:
        prompt_ids = encode_text(run.tokenizer, config.prompt, "prompt", bos=True, eos=False,
                                 max_len=max_len)
        source = ()
    room = max_len - len(prompt_ids)
    max_new_tokens = cfg.max_new_tokens or room
    if max_new_tokens > room or room < 1:
        raise ConfigError(f"the prompt takes {len(prompt_ids)} of model.max_len={max_len} positions, "
                          f"leaving {room} for sampling.max_new_tokens={max_new_tokens}: lower it "
                          "or shorten the prompt")
    decoding = dict(beam_size=cfg.beam_size, length_penalty=cfg.length_penalty) if beams else dict(
        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, num_samples=cfg.num_samples,
        key=jax.random.key(cfg.seed))
    done = generate(run.model, np.asarray([prompt_ids]), np.asarray([len(prompt_ids)]),
                    source=source, max_new_tokens=max_new_tokens, **decoding)
    return Sampled(run.model_cfg.kind, run.step, completion_texts(run.tokenizer, done)[0],
                   np.asarray(done.logprobs[0]).tolist(), np.asarray(done.lengths[0]).tolist(),
                   ended_at_eos(done)[0].tolist())


def report(config: SampleConfig, sampled: Sampled, title: str) -> None:
    print(f"{title} from {config.checkpoint} ({sampled.kind}, step {sampled.step}), "
          f"prompt {config.prompt!r}:")
    print(f"  {'logprob':>9}  {'tokens':>6}  completion")
    for text, logprob, length, ended in zip(sampled.texts, sampled.logprobs, sampled.lengths,
                                            sampled.ended):
        print(f"  {logprob:9.4f}  {length:6d}  {text!r}" + ("" if ended else "  (no <eos>)"))


@hydra.main(version_base=None, config_path="../conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    try:
        config = to_sample_config(cfg)
        s = config.sampling
        report(config, sample_run(config),
               f"{s.num_samples} samples (temperature {s.temperature:g}, top_k {s.top_k}, "
               f"top_p {s.top_p:g}, seed {s.seed})")
        if s.beam_size:
            report(config, sample_run(config, beams=True),
                   f"{s.beam_size} beams (length_penalty {s.length_penalty:g})")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    sys.argv[1:] = quote_free_text(sys.argv[1:], FREE_TEXT_KEYS)
    preflight(sys.argv[1:], "sample", to_sample_config)
    main()
