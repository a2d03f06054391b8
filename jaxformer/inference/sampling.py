"""What `python -m jaxformer.sample` does: restore a run and complete a prompt, each completion
with its log-probability under the model.

The prompt is framed as training framed it (the run's generative objective decides): a decoder
continues `<bos> prompt`, an encoder-decoder decodes a target after `<bos>` from the source
`prompt <eos>`. Completions stop at `<eos>` or after `sampling.max_new_tokens` (default: whatever
the context window leaves). The log-probability is the model's own (unwarped) over the
completion's tokens, `<eos>` included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import jax
import numpy as np
from omegaconf import MISSING

from jaxformer.config import SamplingConfig, check_step
from jaxformer.data.tokenizers import eos_id
from jaxformer.errors import UserError
from jaxformer.models.decoding import completion_texts, ended_at_eos, generate
from jaxformer.objectives import generative_objective
from jaxformer.runs import RestoredRun, RunDir


@dataclass
class SampleConfig:
    checkpoint: str = MISSING  # a run dir written by `python -m jaxformer.train`
    prompt: str = MISSING  # free text: the decoder's prompt, the encoder-decoder's source
    step: Optional[int] = None  # checkpoint step; None: the latest
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        if not self.prompt:
            raise UserError("prompt is empty: pass the text to complete, e.g. prompt=12+34=")
        check_step(self.step)
        RunDir.open(self.checkpoint)


class Sampled(NamedTuple):
    kind: str  # the model family
    step: int  # the checkpoint step
    texts: list[str]  # completions (samples, or beams best first)
    logprobs: list[float]
    lengths: list[int]  # tokens, <eos> included
    ended: list[bool]  # stopped at <eos> (else at max_new_tokens)


def sample_run(config: SampleConfig, beams: bool = False,
               run: RestoredRun | None = None) -> Sampled:
    """Complete the prompt (with beam search when `beams`) with `run`, or the run restored from
    config.checkpoint when none is given."""
    run = run or RunDir.open(config.checkpoint).restore(config.step)
    objective = generative_objective(run.model_cfg, config.checkpoint, "sample", run.objective)
    cfg = config.sampling
    cfg.check_vocab(run.model_cfg.vocab_size)
    max_len = run.model_cfg.max_len
    prompt_ids, source = objective.frame_prompt(run.tokenizer, config.prompt, max_len)
    room = max_len - len(prompt_ids)
    max_new_tokens = cfg.max_new_tokens or room
    if max_new_tokens > room or room < 1:
        raise UserError(f"the prompt takes {len(prompt_ids)} of model.max_len={max_len} positions, "
                        f"leaving {room} for sampling.max_new_tokens={max_new_tokens}: lower it "
                        "or shorten the prompt")
    decoding = dict(beam_size=cfg.beam_size, length_penalty=cfg.length_penalty) if beams else dict(
        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, num_samples=cfg.num_samples,
        key=jax.random.key(cfg.seed))
    eos = eos_id(run.tokenizer, f"the tokenizer of {config.checkpoint}")  # <eos> (2) or GPT-2's
    done = generate(run.model, np.asarray([prompt_ids]), np.asarray([len(prompt_ids)]),
                    source=source, max_new_tokens=max_new_tokens, stop_tokens=(eos,), **decoding)
    return Sampled(run.model_cfg.kind, run.step, completion_texts(run.tokenizer, done, eos)[0],
                   np.asarray(done.logprobs[0]).tolist(), np.asarray(done.lengths[0]).tolist(),
                   ended_at_eos(done, eos)[0].tolist())
