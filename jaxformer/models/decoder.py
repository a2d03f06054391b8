"""GPT-like decoder: token embedding + positions, causal blocks, final norm, tied LM head; with
model.num_classes > 0 also a sequence classifier on the last non-padding token.

Decoding (`init_cache`, `decode_fn`) runs the same blocks over a KV cache: tokens carry their
absolute positions, so learned, sinusoidal and rope positions are those of the full forward.
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.attention import (
    cache_mask, causal_mask, combine_masks, padding_mask, segment_mask,
)
from jaxformer.models.blocks import DecodeCache, LayerStack
from jaxformer.models.heads import ClassificationHead, Classifies
from jaxformer.models.layers import Embed, Embeddings, OutputHead, make_norm, positions_like


def require_vocab(cfg: ModelConfig) -> int:
    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size is unset: build the model through models.build_model")
    return cfg.vocab_size


class Decoder(Classifies, nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.max_len = cfg.max_len
        self.embed = Embed(require_vocab(cfg), cfg.d_model, cfg, rngs=rngs)
        self.lm_head = OutputHead(cfg, rngs=rngs)  # the tied table, or a kernel of its own
        self.embeddings = Embeddings(cfg, rngs=rngs)
        self.stack = LayerStack(cfg, cfg.n_layers, rngs=rngs)
        self.final_norm = make_norm(cfg, rngs=rngs) if cfg.use_final_norm else None
        self.classifier = (ClassificationHead(cfg, pooling="last", rngs=rngs)
                           if cfg.num_classes else None)

    def hidden(
        self, tokens_bt: jax.Array, valid_bt: jax.Array | None = None, *,
        segment_ids_bt: jax.Array | None = None, positions_bt: jax.Array | None = None,
        deterministic: bool = True, rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Final hidden states (B, T, d_model); `valid_bt` masks padding keys. Packed documents:
        `segment_ids_bt` keeps attention inside each document, `positions_bt` (default 0..T-1)
        restart at each."""
        dropout_kw = {"deterministic": deterministic, "rngs": rngs}
        positions_bt = positions_like(tokens_bt) if positions_bt is None else positions_bt
        x_btd = self.embeddings(self.embed(tokens_bt), positions_bt, **dropout_kw)
        mask = combine_masks(
            causal_mask(tokens_bt.shape[1]), None if valid_bt is None else padding_mask(valid_bt),
            None if segment_ids_bt is None else segment_mask(segment_ids_bt),
        )
        x_btd = self.stack(x_btd, mask, positions_bt, **dropout_kw)
        return x_btd if self.final_norm is None else self.final_norm(x_btd)

    def logits(self, hidden_btd: jax.Array) -> jax.Array:
        """Next-token logits (B, T, vocab), float32, from final hidden states."""
        return self.lm_head(self.embed, hidden_btd)

    def __call__(
        self, tokens_bt: jax.Array, valid_bt: jax.Array | None = None, *,
        segment_ids_bt: jax.Array | None = None, positions_bt: jax.Array | None = None,
        deterministic: bool = True, rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Next-token logits (B, T, vocab), float32."""
        return self.logits(self.hidden(tokens_bt, valid_bt, segment_ids_bt=segment_ids_bt,
                                       positions_bt=positions_bt, deterministic=deterministic,
                                       rngs=rngs))

    def init_cache(self, batch: int, width: int) -> DecodeCache:
        """An empty KV cache of `width` positions for `batch` rows."""
        return DecodeCache(self.stack.empty_cache(batch, width))

    def decode_fn(self) -> Callable:
        """`step(tokens_bt, positions_bt, cache) -> (hidden_btd, cache)`: hidden states (B, T,
        d_model) of tokens at absolute positions, attending to cached positions <= their own, their
        keys/values written to the cache. Build it once, outside the decode loop."""
        run_stack = self.stack.decode_fn()

        def step(tokens_bt: jax.Array, positions_bt: jax.Array, cache: DecodeCache):
            x_btd = self.embeddings(self.embed(tokens_bt), positions_bt, deterministic=True)
            x_btd, layers = run_stack(x_btd, cache_mask(positions_bt, cache.width), positions_bt,
                                      cache.layers)
            x_btd = x_btd if self.final_norm is None else self.final_norm(x_btd)
            return x_btd, cache._replace(layers=layers)

        return step
