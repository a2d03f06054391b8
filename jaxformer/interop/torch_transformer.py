"""`torch.nn.Transformer` weights -> jaxformer EncoderDecoder (for parity tests and ports).

Works on a numpy copy of `module.state_dict()` (no torch import here). nn.Transformer has no
embeddings, so the EncoderDecoder's token table and position embeddings keep their initialisation;
compare through `encode_vectors` / `decode_vectors`. Its layers map as norm_first=False ->
norm="post", norm_first=True -> norm="pre"; it always applies a final LayerNorm to both stacks
(final_norm=True).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from jaxformer.config import ModelConfig
from jaxformer.interop.params import Link, linear, model_from_tensors, norm, require
from jaxformer.models.encoder_decoder import EncoderDecoder

ORIGIN = "torch.nn.Transformer state_dict"


def attention_links(params: str, key: str, n_layers: int) -> list[Link]:
    """nn.MultiheadAttention: in_proj_weight/bias stack [q; k; v] on the output axis."""
    qkv = tuple(f"{params}.{name}" for name in ("query", "key", "value"))
    return [*linear(qkv, f"{key}.in_proj", n_layers, suffixes=("_weight", "_bias")),
            *linear(f"{params}.out", f"{key}.out_proj", n_layers)]


def torch_transformer_links(cfg: ModelConfig) -> list[Link]:
    n_enc, n_dec = cfg.n_layers, cfg.n_decoder_layers or cfg.n_layers
    enc, dec = "encoder.blocks.", "decoder.blocks."
    enc_layer, dec_layer = "encoder.layers.{i}.", "decoder.layers.{i}."
    return [
        *attention_links(enc + "attention", enc_layer + "self_attn", n_enc),
        *norm(enc + "attention_branch.norm", enc_layer + "norm1", n_enc),
        *linear(enc + "mlp.up", enc_layer + "linear1", n_enc),
        *linear(enc + "mlp.down", enc_layer + "linear2", n_enc),
        *norm(enc + "mlp_branch.norm", enc_layer + "norm2", n_enc),
        *norm("encoder_norm", "encoder.norm"),
        *attention_links(dec + "attention", dec_layer + "self_attn", n_dec),
        *norm(dec + "attention_branch.norm", dec_layer + "norm1", n_dec),
        *attention_links(dec + "cross_attention", dec_layer + "multihead_attn", n_dec),
        *norm(dec + "cross_attention_branch.norm", dec_layer + "norm2", n_dec),
        *linear(dec + "mlp.up", dec_layer + "linear1", n_dec),
        *linear(dec + "mlp.down", dec_layer + "linear2", n_dec),
        *norm(dec + "mlp_branch.norm", dec_layer + "norm3", n_dec),
        *norm("decoder_norm", "decoder.norm"),
    ]


def torch_transformer_to_encoder_decoder(state_dict: Mapping[str, np.ndarray], cfg: ModelConfig, *,
                                         seed: int = 0) -> EncoderDecoder:
    """An EncoderDecoder of `cfg` holding an nn.Transformer's weights (numpy state dict).

    `cfg` must describe the torch module: d_model, n_heads, layer counts, d_ff, layer_norm_eps
    (torch's default is 1e-5), activation relu|gelu, norm post|pre, final_norm=True."""
    require(ORIGIN, "model.kind", cfg.kind, ("encoder_decoder",))
    require(ORIGIN, "model.norm", cfg.norm, ("post", "pre"),
            ": norm_first=False is post, norm_first=True is pre")
    require(ORIGIN, "model.activation", cfg.activation, ("relu", "gelu"),
            ": nn.Transformer's string activations")
    require(ORIGIN, "model.final_norm", cfg.use_final_norm, (True,),
            ": nn.Transformer always normalises both stacks' outputs")
    require(ORIGIN, "model.positions", cfg.positions, ("learned", "sinusoidal"),
            ": rope would rotate queries and keys inside attention")
    for field, value in (("model.residual", cfg.residual), ("model.bias", cfg.bias)):
        require(ORIGIN, field, value, (True,))
    return model_from_tensors(
        cfg, state_dict, torch_transformer_links(cfg), origin=ORIGIN, out_in=True, seed=seed,
        keep_init=("embed.", "encoder_embeddings.", "decoder_embeddings."),
    )
