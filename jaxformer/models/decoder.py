"""GPT-like decoder: token + position embeddings, causal blocks, final norm, tied LM head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.attention import causal_mask, combine_masks, padding_mask
from jaxformer.models.blocks import DecoderBlock
from jaxformer.models.layers import Embed, check_length, make_norm, make_positions


class Decoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is unset: build the model through models.build_model")
        self.max_len = cfg.max_len
        self.embed = Embed(cfg.vocab_size, cfg.d_model, cfg, rngs=rngs)
        self.positions = make_positions(cfg, rngs=rngs)
        self.embed_dropout = nnx.Dropout(cfg.dropout)
        self.blocks = nnx.List([DecoderBlock(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        # pre-LN leaves the residual stream unnormalised, so it needs a final norm (GPT-2's ln_f)
        self.final_norm = make_norm(cfg, rngs=rngs) if cfg.norm == "pre" else None

    def __call__(
        self,
        tokens_bt: jax.Array,
        valid_bt: jax.Array | None = None,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Next-token logits (B, T, vocab) for `tokens_bt`; `valid_bt` masks padding keys."""
        length = tokens_bt.shape[1]
        check_length(length, self.max_len)
        dropout_kw = {"deterministic": deterministic, "rngs": rngs}
        positions_bt = jnp.broadcast_to(jnp.arange(length), tokens_bt.shape)
        x_btd = self.embed(tokens_bt) + self.positions(positions_bt).astype(self.embed.dtype)
        x_btd = self.embed_dropout(x_btd, **dropout_kw)
        mask = combine_masks(
            causal_mask(length), None if valid_bt is None else padding_mask(valid_bt)
        )
        for block in self.blocks:
            x_btd = block(x_btd, mask, **dropout_kw)
        if self.final_norm is not None:
            x_btd = self.final_norm(x_btd)
        return self.embed.attend(x_btd).astype(jnp.float32)
