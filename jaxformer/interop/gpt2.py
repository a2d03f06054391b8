"""GPT-2 checkpoints <-> jaxformer Decoder, both ways (folders: hf_decoder.py).

GPT-2 is the decoder with norm="pre", a final norm (ln_f), learned positions, biases, a tied output
head and activation gelu_new (= gelu_tanh). Its Conv1D weights are already (in, out); c_attn packs
q, k, v along the output axis. Ablation switches that map: activation (gelu_tanh, gelu, relu, silu,
sigmoid), dropout, layer_norm_eps, init, attention, scan_layers, dtype; everything else is refused.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from jaxformer.config import ModelConfig
from jaxformer.interop.params import (
    HF_ACTIVATIONS, HF_EXPORT_ACTIVATIONS, InteropError, Link, linear, make_config,
    model_from_params, model_params, norm, params_from_tensors, params_to_links, require,
)
from jaxformer.models.decoder import Decoder

PREFIX = "transformer."  # GPT2LMHeadModel's names; the original hub checkpoints have none
# the tied head, and the causal-mask buffers older checkpoints saved
IGNORED = r"lm_head\.weight|h\.\d+\.attn\.(bias|masked_bias)"


def gpt2_config_to_model_config(hf_config: dict, origin: str = "config.json",
                                **overrides) -> ModelConfig:
    """The Decoder config that computes what a GPT-2 config does (or InteropError).

    `overrides` may set run-time switches only (scan_layers, attention, dtype, dropout)."""
    require(origin, "model_type", hf_config.get("model_type"), ("gpt2",),
            ": gpt2_config_to_model_config maps GPT-2 (Llama / Qwen3: llama.py)")
    activation = hf_config.get("activation_function", "gelu_new")
    require(origin, "activation_function", activation, HF_ACTIVATIONS)
    for flag, value in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("add_cross_attention", False), ("tie_word_embeddings", True)):
        require(origin, flag, hf_config.get(flag, value), (value,),
                ": jaxformer's decoder needs this")
    missing = [k for k in ("vocab_size", "n_embd", "n_head", "n_layer", "n_positions")
               if k not in hf_config]
    if missing:
        raise InteropError(f"{origin}: lacks {', '.join(missing)}, needed to build the decoder")
    d_model = hf_config["n_embd"]
    fields = dict(
        kind="decoder", vocab_size=hf_config["vocab_size"], d_model=d_model,
        n_heads=hf_config["n_head"], n_layers=hf_config["n_layer"],
        d_ff=hf_config.get("n_inner") or 4 * d_model, max_len=hf_config["n_positions"],
        activation=HF_ACTIVATIONS[activation], positions="learned", norm="pre", final_norm=True,
        residual=True, bias=True, embed_norm=False, type_vocab_size=0,
        layer_norm_eps=hf_config.get("layer_norm_epsilon", 1e-5),
        dropout=hf_config.get("resid_pdrop", 0.1),
    )
    return make_config(origin, overrides, **fields)


def model_config_to_gpt2_config(cfg: ModelConfig) -> dict:
    """The GPT-2 config.json of a decoder config; refuses switches GPT-2 cannot express."""
    origin = "GPT-2 export"
    require(origin, "model.kind", cfg.kind, ("decoder",))
    require(origin, "model.activation", cfg.activation, HF_EXPORT_ACTIVATIONS)
    for field, value, needed in (
        ("model.norm", cfg.norm, "pre"), ("model.final_norm", cfg.use_final_norm, True),
        ("model.positions", cfg.positions, "learned"), ("model.residual", cfg.residual, True),
        ("model.bias", cfg.bias, True), ("model.embed_norm", cfg.embed_norm, False),
        ("model.type_vocab_size", cfg.type_vocab_size, 0),
        ("model.norm_type", cfg.norm_type, "layernorm"), ("model.mlp", cfg.mlp, "dense"),
        ("model.qk_norm", cfg.qk_norm, False), ("model.tie_embeddings", cfg.tie_embeddings, True),
        ("model.n_kv_heads", cfg.kv_heads, cfg.n_heads),
        ("model.head_dim", cfg.head_size, cfg.d_model // cfg.n_heads),
        ("model.parallel_block", cfg.parallel_block, False),
        ("model.attn_logit_softcap", cfg.attn_logit_softcap, None),
        ("model.final_logit_softcap", cfg.final_logit_softcap, None),
    ):
        require(origin, field, value, (needed,),
                ": GPT-2 is pre-LN with ln_f, learned positions, biases, a dense MLP and a tied "
                "head, with no embedding norm, token types, grouped heads or soft caps")
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size, "n_positions": cfg.max_len, "n_embd": cfg.d_model,
        "n_head": cfg.n_heads, "n_layer": cfg.n_layers, "n_inner": cfg.d_ff,
        "activation_function": HF_EXPORT_ACTIVATIONS[cfg.activation],
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": 0.0,
        "layer_norm_epsilon": cfg.layer_norm_eps, "tie_word_embeddings": True,
        "scale_attn_weights": True,
        "bos_token_id": None, "eos_token_id": None,  # GPT-2's 50256 means nothing to our tokenizers
    }


def gpt2_links(cfg: ModelConfig) -> list[Link]:
    n, layer, blocks = cfg.n_layers, "h.{i}.", "stack.blocks."
    qkv = tuple(blocks + f"attention.{name}" for name in ("query", "key", "value"))
    return [
        Link(("embed.embedding",), "wte.weight"),
        Link(("embeddings.positions.embedding",), "wpe.weight"),
        *norm(blocks + "attention_branch.norm", layer + "ln_1", n),
        *linear(qkv, layer + "attn.c_attn", n),
        *linear(blocks + "attention.out", layer + "attn.c_proj", n),
        *norm(blocks + "mlp_branch.norm", layer + "ln_2", n),
        *linear(blocks + "mlp.up", layer + "mlp.c_fc", n),
        *linear(blocks + "mlp.down", layer + "mlp.c_proj", n),
        *norm("final_norm", "ln_f"),
    ]


def gpt2_params(state_dict: Mapping[str, np.ndarray], hf_config: dict, *,
                origin: str = "GPT-2 checkpoint", **overrides) -> tuple[ModelConfig, dict]:
    """(Decoder config, its params from a GPT-2 state dict with or without "transformer.")."""
    cfg = gpt2_config_to_model_config(hf_config, origin, **overrides)
    tensors = {key.removeprefix(PREFIX): value for key, value in state_dict.items()}
    return cfg, params_from_tensors(cfg, tensors, gpt2_links(cfg), origin=origin, out_in=False,
                                    ignore=IGNORED)


def gpt2_to_decoder(state_dict: Mapping[str, np.ndarray], hf_config: dict, *, seed: int = 0,
                    origin: str = "GPT-2 checkpoint", **overrides) -> Decoder:
    """A Decoder holding a GPT-2 checkpoint's weights (numpy state dict, with or without the
    "transformer." prefix). `overrides`: run-time switches (e.g. scan_layers=False)."""
    cfg, params = gpt2_params(state_dict, hf_config, origin=origin, **overrides)
    return model_from_params(cfg, params, origin=origin, seed=seed)


def decoder_to_gpt2(model: Decoder, cfg: ModelConfig) -> tuple[dict[str, np.ndarray], dict]:
    """(state dict of float32 numpy arrays with GPT2LMHeadModel's names, GPT-2 config dict).
    The tied lm_head.weight is left out, as transformers' own save_pretrained does."""
    hf_config = model_config_to_gpt2_config(cfg)
    tensors = params_to_links(model_params(model), gpt2_links(cfg), origin="GPT-2 export",
                              out_in=False)
    return {PREFIX + key: value for key, value in tensors.items()}, hf_config
