"""Encoder-decoder (Vaswani et al. 2017, T5): a bidirectional encoder over the source, a causal
decoder that cross-attends to it, one token table shared by source, target and the output head.

Decoding encodes the source once (`init_cache`: the memory's cross-attention keys/values per
layer), then runs the decoder stack over a self-attention KV cache (`decode_fn`)."""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.attention import cache_mask, causal_mask, combine_masks, padding_mask
from jaxformer.models.blocks import DecodeCache, LayerStack
from jaxformer.models.decoder import require_vocab
from jaxformer.models.layers import Embed, Embeddings, OutputHead, make_norm, positions_like


class EncoderDecoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.max_len = cfg.max_len
        self.embed = Embed(require_vocab(cfg), cfg.d_model, cfg, rngs=rngs)
        self.lm_head = OutputHead(cfg, rngs=rngs)  # the tied table, or a kernel of its own
        self.encoder_embeddings = Embeddings(cfg, rngs=rngs)
        self.encoder = LayerStack(cfg, cfg.n_layers, rngs=rngs)
        self.encoder_norm = make_norm(cfg, rngs=rngs) if cfg.use_final_norm else None
        self.decoder_embeddings = Embeddings(cfg, rngs=rngs)
        self.decoder = LayerStack(cfg, cfg.n_decoder_layers or cfg.n_layers, cross_attention=True,
                                  rngs=rngs)
        self.decoder_norm = make_norm(cfg, rngs=rngs) if cfg.use_final_norm else None

    def encode_vectors(self, x_bsd: jax.Array, src_valid_bs: jax.Array | None, **dropout_kw):
        """The encoder stack (+ final norm) over already embedded source vectors."""
        positions_bs = positions_like(x_bsd[..., 0])
        mask = None if src_valid_bs is None else padding_mask(src_valid_bs)
        memory_bsd = self.encoder(x_bsd, mask, positions_bs, **dropout_kw)
        return memory_bsd if self.encoder_norm is None else self.encoder_norm(memory_bsd)

    def decode_vectors(
        self, y_btd: jax.Array, memory_bsd: jax.Array, src_valid_bs: jax.Array | None,
        tgt_valid_bt: jax.Array | None = None, **dropout_kw,
    ) -> jax.Array:
        """The decoder stack (+ final norm) over embedded targets; returns hidden states."""
        positions_bt = positions_like(y_btd[..., 0])
        self_mask = combine_masks(
            causal_mask(y_btd.shape[1]), None if tgt_valid_bt is None else padding_mask(tgt_valid_bt)
        )
        memory_mask = None if src_valid_bs is None else padding_mask(src_valid_bs)
        h_btd = self.decoder(y_btd, self_mask, positions_bt, memory_bsd, memory_mask, **dropout_kw)
        return h_btd if self.decoder_norm is None else self.decoder_norm(h_btd)

    def encode(
        self, src_bs: jax.Array, src_valid_bs: jax.Array | None = None, *,
        deterministic: bool = True, rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Encoder memory (B, S, d_model) for source tokens; `src_valid_bs` masks padding."""
        dropout_kw = {"deterministic": deterministic, "rngs": rngs}
        x_bsd = self.encoder_embeddings(self.embed(src_bs), positions_like(src_bs), **dropout_kw)
        return self.encode_vectors(x_bsd, src_valid_bs, **dropout_kw)

    def decode(
        self, tgt_bt: jax.Array, memory_bsd: jax.Array, src_valid_bs: jax.Array | None = None, *,
        deterministic: bool = True, rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Next-token logits (B, T, vocab), float32, for target tokens given the memory."""
        dropout_kw = {"deterministic": deterministic, "rngs": rngs}
        y_btd = self.decoder_embeddings(self.embed(tgt_bt), positions_like(tgt_bt), **dropout_kw)
        return self.logits(self.decode_vectors(y_btd, memory_bsd, src_valid_bs, **dropout_kw))

    def logits(self, hidden_btd: jax.Array) -> jax.Array:
        """Next-token logits (B, T, vocab), float32, from decoder hidden states."""
        return self.lm_head(self.embed, hidden_btd)

    def init_cache(self, batch: int, width: int, src_bs: jax.Array,
                   src_valid_bs: jax.Array | None = None) -> DecodeCache:
        """Encode the source (B, S) once: an empty self-attention cache of `width` target
        positions, each decoder layer's keys/values of the memory, and the source padding."""
        memory_bsd = self.encode(src_bs, src_valid_bs)
        return DecodeCache(self.decoder.empty_cache(batch, width, memory_bsd), src_valid_bs)

    def decode_fn(self) -> Callable:
        """`step(tgt_bt, positions_bt, cache) -> (hidden_btd, cache)`: decoder hidden states of
        target tokens at absolute positions, through the self-attention cache (written for them)
        and the cached memory. Build it once, outside the decode loop."""
        run_decoder = self.decoder.decode_fn()

        def step(tgt_bt: jax.Array, positions_bt: jax.Array, cache: DecodeCache):
            y_btd = self.decoder_embeddings(self.embed(tgt_bt), positions_bt, deterministic=True)
            memory_mask = (None if cache.memory_valid_bs is None
                           else padding_mask(cache.memory_valid_bs))
            h_btd, layers = run_decoder(y_btd, cache_mask(positions_bt, cache.width), positions_bt,
                                        cache.layers, memory_mask)
            h_btd = h_btd if self.decoder_norm is None else self.decoder_norm(h_btd)
            return h_btd, cache._replace(layers=layers)

        return step

    def __call__(
        self, src_bs: jax.Array, src_valid_bs: jax.Array | None, tgt_bt: jax.Array, *,
        deterministic: bool = True, rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Teacher-forced logits (B, T, vocab): position t predicts tgt[t + 1]."""
        memory_bsd = self.encode(src_bs, src_valid_bs, deterministic=deterministic, rngs=rngs)
        return self.decode(tgt_bt, memory_bsd, src_valid_bs, deterministic=deterministic, rngs=rngs)
