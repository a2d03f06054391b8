"""BERT-like encoder: embeddings (+ token types), bidirectional blocks, masked-LM and
sequence-classification heads. `model(tokens, valid)` returns the final hidden states."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.attention import combine_masks, padding_mask, segment_mask
from jaxformer.models.blocks import LayerStack
from jaxformer.models.decoder import require_vocab
from jaxformer.models.heads import ClassificationHead, Classifies
from jaxformer.models.layers import (
    ACTIVATION_FNS, Embed, Embeddings, axes, dense, make_norm, norm_layer, positions_like,
)


class MLMHead(nnx.Module):
    """BERT's prediction head: dense, activation, LayerNorm, then the tied embedding plus a bias."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.transform = dense(cfg, cfg.d_model, cfg.d_model, rngs=rngs, bias=True)
        self.activation = ACTIVATION_FNS[cfg.activation]
        self.norm = norm_layer(cfg, rngs=rngs)
        self.bias = nnx.Param(jnp.zeros((require_vocab(cfg),), jnp.dtype(cfg.param_dtype)),
                              **axes("vocab"))

    def __call__(self, x_btd: jax.Array, embed: Embed) -> jax.Array:
        h_btd = self.norm(self.activation(self.transform(x_btd)))
        return (embed.attend(h_btd) + self.bias[...]).astype(jnp.float32)


class Encoder(Classifies, nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.max_len = cfg.max_len
        self.embed = Embed(require_vocab(cfg), cfg.d_model, cfg, rngs=rngs)
        self.embeddings = Embeddings(cfg, rngs=rngs)
        self.stack = LayerStack(cfg, cfg.n_layers, rngs=rngs)
        self.final_norm = make_norm(cfg, rngs=rngs) if cfg.use_final_norm else None
        self.mlm_head = MLMHead(cfg, rngs=rngs)
        self.classifier = ClassificationHead(cfg, rngs=rngs) if cfg.num_classes else None

    def __call__(
        self, tokens_bt: jax.Array, valid_bt: jax.Array | None = None,
        token_types_bt: jax.Array | None = None, *, segment_ids_bt: jax.Array | None = None,
        positions_bt: jax.Array | None = None, deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Final hidden states (B, T, d_model); `valid_bt` (1 = token, 0 = padding) masks keys.
        Packed documents: `segment_ids_bt` keeps attention inside each document, `positions_bt`
        (default 0..T-1) restart at each."""
        dropout_kw = {"deterministic": deterministic, "rngs": rngs}
        positions_bt = positions_like(tokens_bt) if positions_bt is None else positions_bt
        x_btd = self.embeddings(self.embed(tokens_bt), positions_bt, token_types_bt, **dropout_kw)
        mask = combine_masks(None if valid_bt is None else padding_mask(valid_bt),
                             None if segment_ids_bt is None else segment_mask(segment_ids_bt))
        x_btd = self.stack(x_btd, mask, positions_bt, **dropout_kw)
        return x_btd if self.final_norm is None else self.final_norm(x_btd)

    def hidden(self, tokens_bt: jax.Array, valid_bt: jax.Array | None = None, **kw) -> jax.Array:
        """Final hidden states, as the decoder names them (so objectives treat both alike)."""
        return self(tokens_bt, valid_bt, **kw)

    def mlm_logits(self, hidden_btd: jax.Array) -> jax.Array:
        """Masked-LM logits (B, T, vocab), float32."""
        return self.mlm_head(hidden_btd, self.embed)
