"""A trained run from Python (a notebook, a script): `jaxformer.load_run(RUN_DIR)`.

    run = jaxformer.load_run("outputs/text_lm_cpu/...")
    run.generate("def fibonacci(n):", max_new_tokens=64, temperature=0.8, top_p=0.95)
    run.score("import os\\nprint(os.getcwd())\\n")   # {"bpb": ..., "nats": ..., "bytes": ...}
    run.model, run.tokenizer, run.config             # the NNX module, a tokenizers.Tokenizer,
                                                     # the TrainConfig it was trained with

`generate` frames the prompt as the run's training did and samples with the sample app's controls;
`score` gives a decoder's bits per byte of any text: the text's tokens after `<eos>` (the separator
every training document followed), read in windows of the model's context, each predicted token
counted once, over the UTF-8 bytes those tokens stand for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tokenizers import Tokenizer

from jaxformer.config import SamplingConfig, TrainConfig
from jaxformer.data.tokenizers import eos_id, token_byte_lengths
from jaxformer.errors import UserError
from jaxformer.inference.sampling import SampleConfig, sample_run
from jaxformer.models.decoder import Decoder
from jaxformer.runs import RestoredRun, RunDir


@dataclass
class LoadedRun:
    path: Path
    restored: RestoredRun

    @property
    def model(self) -> nnx.Module:
        return self.restored.model

    @property
    def tokenizer(self) -> Tokenizer:
        return self.restored.tokenizer

    @property
    def step(self) -> int:
        return self.restored.step

    @property
    def objective(self) -> str | None:
        return self.restored.objective

    @cached_property
    def token_bytes(self) -> np.ndarray:
        """(vocab,) UTF-8 bytes per token id, for bits per byte."""
        return token_byte_lengths(self.tokenizer)

    @cached_property
    def config(self) -> TrainConfig:
        """The training config the run was launched with."""
        return RunDir.open(self.path).config

    def generate(self, prompt: str, **sampling) -> list[str]:
        """Completions of `prompt` (sampling: temperature, top_k, top_p, num_samples,
        max_new_tokens, seed, as the sample app's `sampling.` settings; default one greedy)."""
        controls = SamplingConfig(**{"temperature": 0.0, "num_samples": 1, **sampling})
        return sample_run(SampleConfig(str(self.path), prompt, self.step, controls),
                          run=self.restored).texts

    def score(self, text: str) -> dict[str, float]:
        """Bits per byte (and nats, bytes, tokens) of `text` under a decoder."""
        if not isinstance(self.model, Decoder):
            raise UserError(f"score reads text with a decoder; {self.path} holds a "
                            f"{self.restored.model_cfg.kind}")
        return score_text(self.model, self.tokenizer, text, self.token_bytes)


def load_run(path: str | Path, step: int | None = None) -> LoadedRun:
    """The run in `path` at checkpoint `step` (None: the latest)."""
    return LoadedRun(Path(path), RunDir.open(path).restore(step))


def score_text(model: nnx.Module, tokenizer: Tokenizer, text: str,
               token_bytes: np.ndarray) -> dict[str, float]:
    """Sum of -log p(token) over the text's tokens, each predicted from the tokens before it in
    its window of model.max_len (windows overlap by one token), and the bytes they stand for."""
    ids = np.asarray([eos_id(tokenizer, "the run's tokenizer"), *tokenizer.encode(text).ids],
                     np.int32)
    context = model.max_len
    starts = range(0, max(len(ids) - 1, 1), context)
    graphdef, state = nnx.split(model)
    nats = 0.0
    for start in starts:
        window = ids[start:start + context + 1]
        padded = np.zeros(context + 1, np.int32)  # one compiled shape for every window
        padded[:len(window)] = window
        weights = (np.arange(context) < len(window) - 1).astype(np.float32)
        nats += float(_window_nats(graphdef, state, padded[None], weights[None]))
    n_bytes = int(token_bytes[ids[1:]].sum())
    return {"bpb": nats / (math.log(2) * n_bytes) if n_bytes else float("nan"), "nats": nats,
            "bytes": n_bytes, "tokens": int(len(ids) - 1)}


@partial(jax.jit, static_argnames=("graphdef",))
def _window_nats(graphdef, state, tokens_bt, weights_bt):
    model = nnx.merge(graphdef, state)
    logp_btv = jax.nn.log_softmax(model(tokens_bt[:, :-1]).astype(jnp.float32))
    token_logp_bt = jnp.take_along_axis(logp_btv, tokens_bt[:, 1:, None], axis=-1)[..., 0]
    return -(token_logp_bt * weights_bt).sum()
