"""Llama and Qwen3 checkpoints (`LlamaForCausalLM`, `Qwen3ForCausalLM`) <-> jaxformer Decoder.

Both are the decoder with norm="pre", RMSNorm (norm_type="rmsnorm", epsilon rms_norm_eps), a final
norm (model.norm), rope positions (rotate-half layout, theta rope_theta), a gated MLP
(mlp="glu": down(act(gate(x)) * up(x)), d_ff = intermediate_size, glu_param_matched=False) and
grouped-query attention (n_kv_heads = num_key_value_heads, head_dim); Qwen3 adds an RMSNorm over
head_dim on each query and key head before rope (qk_norm=True). The output head is tied or a
separate lm_head (tie_embeddings). torch Linear weights are (out, in): transposed here.
Refused in one line: rope scaling, sliding-window layers, attention_bias != mlp_bias (jaxformer's
model.bias covers both), activations jaxformer does not compute.
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

MODEL_TYPES = ("llama", "qwen3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# what transformers assumes for a key config.json leaves out (None: derived from other fields)
DEFAULTS = {
    "llama": dict(num_key_value_heads=None, head_dim=None, hidden_act="silu", rms_norm_eps=1e-6,
                  max_position_embeddings=2048, tie_word_embeddings=False),
    "qwen3": dict(num_key_value_heads=32, head_dim=128, hidden_act="silu", rms_norm_eps=1e-6,
                  max_position_embeddings=32768, tie_word_embeddings=False),
}
DEFAULT_ROPE_THETA = 10000.0
# a tied head's lm_head.weight (some savers write it), and the rope buffers older savers wrote
IGNORED_TIED = r"lm_head\.weight"
IGNORED = r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq"


def llama_config_to_model_config(hf_config: dict, origin: str = "config.json",
                                 **overrides) -> ModelConfig:
    """The Decoder config that computes what a Llama or Qwen3 config does (or InteropError).

    `overrides` may set run-time switches only (scan_layers, attention, dtype, dropout)."""
    model_type = hf_config.get("model_type")
    require(origin, "model_type", model_type, MODEL_TYPES,
            ": llama_config_to_model_config maps Llama and Qwen3 (GPT-2 folders: load_hf_decoder)")
    config = {**DEFAULTS[model_type], **hf_config}
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in config]
    if missing:
        raise InteropError(f"{origin}: lacks {', '.join(missing)}, needed to build the decoder")
    require(origin, "hidden_act", config["hidden_act"], HF_ACTIVATIONS)
    rope_theta = rope_theta_of(config, origin)
    require(origin, "use_sliding_window", config.get("use_sliding_window", False), (False,),
            ": jaxformer's attention is global in every layer")
    windowed = [t for t in config.get("layer_types") or () if t != "full_attention"]
    if windowed:
        raise InteropError(f"{origin}: layer_types holds {windowed[0]!r}; jaxformer's attention "
                           "is full_attention in every layer")
    attention_bias = config.get("attention_bias", False)
    mlp_bias = config.get("mlp_bias", False)  # Qwen3's MLP never has biases
    if attention_bias != mlp_bias:
        raise InteropError(f"{origin}: attention_bias={attention_bias} but mlp_bias={mlp_bias}; "
                           "jaxformer's model.bias covers both: they must be equal")
    d_model, n_heads = config["hidden_size"], config["num_attention_heads"]
    n_kv_heads = config["num_key_value_heads"] or n_heads
    head_dim = config["head_dim"] or d_model // n_heads
    fields = dict(
        kind="decoder", vocab_size=config["vocab_size"], d_model=d_model, n_heads=n_heads,
        n_layers=config["num_hidden_layers"], d_ff=config["intermediate_size"],
        max_len=config["max_position_embeddings"], activation=HF_ACTIVATIONS[config["hidden_act"]],
        # the defaults (None) where they agree, so a config written by hand compares equal
        n_kv_heads=None if n_kv_heads == n_heads else n_kv_heads,
        head_dim=None if head_dim * n_heads == d_model else head_dim,
        positions="rope", rope_theta=rope_theta, norm="pre", final_norm=True, residual=True,
        norm_type="rmsnorm", qk_norm=model_type == "qwen3", mlp="glu", glu_param_matched=False,
        bias=attention_bias, embed_norm=False, type_vocab_size=0,
        tie_embeddings=bool(config["tie_word_embeddings"]), layer_norm_eps=config["rms_norm_eps"],
        dropout=0.0,
    )
    return make_config(origin, overrides, **fields)


def rope_theta_of(config: dict, origin: str) -> float:
    """rope_theta from transformers 5's rope_parameters or the older top-level keys; any rope
    scaling (Llama 3.1's "llama3", yarn, linear, dynamic) is refused."""
    if config.get("rope_scaling") is not None:
        raise InteropError(f"{origin}: rope_scaling={config['rope_scaling']!r} is not supported "
                           "(jaxformer's rope is unscaled): use a checkpoint without rope scaling")
    rope = config.get("rope_parameters") or {}
    require(origin, "rope_parameters.rope_type", rope.get("rope_type", "default"), ("default",),
            ": jaxformer's rope is unscaled")
    require(origin, "partial_rotary_factor",
            rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)), (1.0,),
            ": jaxformer rotates the whole head")
    return float(rope.get("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA)))


def model_config_to_llama_config(cfg: ModelConfig) -> dict:
    """The Llama (or, with qk_norm, Qwen3) config.json of a decoder config; refuses switches
    Llama cannot express. intermediate_size is the glu's hidden width (model.mlp_hidden)."""
    model_type = "qwen3" if cfg.qk_norm else "llama"
    origin = f"{ARCHITECTURES[model_type]} export"
    require(origin, "model.kind", cfg.kind, ("decoder",))
    require(origin, "model.activation", cfg.activation, HF_EXPORT_ACTIVATIONS)
    for field, value, needed in (
        ("model.norm", cfg.norm, "pre"), ("model.norm_type", cfg.norm_type, "rmsnorm"),
        ("model.final_norm", cfg.use_final_norm, True), ("model.positions", cfg.positions, "rope"),
        ("model.mlp", cfg.mlp, "glu"), ("model.residual", cfg.residual, True),
        ("model.embed_norm", cfg.embed_norm, False),
        ("model.type_vocab_size", cfg.type_vocab_size, 0),
        ("model.parallel_block", cfg.parallel_block, False),
        ("model.attn_logit_softcap", cfg.attn_logit_softcap, None),
        ("model.final_logit_softcap", cfg.final_logit_softcap, None),
        *((("model.bias", cfg.bias, False),) if cfg.qk_norm else ()),  # Qwen3: no MLP biases
    ):
        require(origin, field, value, (needed,),
                f": {model_type} is pre-RMSNorm with a final norm, rope, a gated MLP, no "
                "embedding norm, token types, parallel blocks or soft caps"
                + (", no biases" if cfg.qk_norm else ""))
    hf_config = {
        "model_type": model_type, "architectures": [ARCHITECTURES[model_type]],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_size, "hidden_act": HF_EXPORT_ACTIVATIONS[cfg.activation],
        "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.layer_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,  # what transformers 4 reads
        "attention_bias": cfg.bias, "attention_dropout": 0.0,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,  # ids of our tokenizers
    }
    if model_type == "llama":
        hf_config["mlp_bias"] = cfg.bias
    else:
        hf_config.update(use_sliding_window=False, sliding_window=None,
                         layer_types=["full_attention"] * cfg.n_layers)
    return hf_config


def llama_links(cfg: ModelConfig) -> list[Link]:
    n, layer, blocks = cfg.n_layers, "model.layers.{i}.", "stack.blocks."
    attention, mlp, bias = blocks + "attention.", blocks + "mlp.", cfg.bias
    links = [
        Link(("embed.embedding",), "model.embed_tokens.weight"),
        *norm(blocks + "attention_branch.norm", layer + "input_layernorm", n, bias=False),
        *[link for name, proj in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o"))
          for link in linear(attention + name, f"{layer}self_attn.{proj}_proj", n, bias=bias)],
        *norm(blocks + "mlp_branch.norm", layer + "post_attention_layernorm", n, bias=False),
        *[link for name in ("gate", "up", "down")
          for link in linear(mlp + name, f"{layer}mlp.{name}_proj", n, bias=bias)],
        *norm("final_norm", "model.norm", bias=False),
    ]
    if cfg.qk_norm:
        links += [*norm(attention + "query_norm", layer + "self_attn.q_norm", n, bias=False),
                  *norm(attention + "key_norm", layer + "self_attn.k_norm", n, bias=False)]
    if not cfg.tie_embeddings:
        links.append(Link(("lm_head.kernel",), "lm_head.weight"))
    return links


def llama_params(state_dict: Mapping[str, np.ndarray], hf_config: dict, *,
                 origin: str = "Llama checkpoint", **overrides) -> tuple[ModelConfig, dict]:
    """(Decoder config, its params from a LlamaForCausalLM / Qwen3ForCausalLM state dict)."""
    cfg = llama_config_to_model_config(hf_config, origin, **overrides)
    ignore = IGNORED + ("|" + IGNORED_TIED if cfg.tie_embeddings else "")
    return cfg, params_from_tensors(cfg, state_dict, llama_links(cfg), origin=origin, out_in=True,
                                    ignore=ignore)


def llama_to_decoder(state_dict: Mapping[str, np.ndarray], hf_config: dict, *, seed: int = 0,
                     origin: str = "Llama checkpoint", **overrides) -> Decoder:
    """A Decoder holding a Llama or Qwen3 checkpoint's weights (numpy state dict of
    *ForCausalLM's names). `overrides`: run-time switches (e.g. scan_layers=False)."""
    cfg, params = llama_params(state_dict, hf_config, origin=origin, **overrides)
    return model_from_params(cfg, params, origin=origin, seed=seed)


def decoder_to_llama(model: Decoder, cfg: ModelConfig) -> tuple[dict[str, np.ndarray], dict]:
    """(state dict of float32 numpy arrays with LlamaForCausalLM's (Qwen3ForCausalLM's, when
    qk_norm) names, its config dict). A tied head writes no lm_head.weight, as transformers'
    own save_pretrained does."""
    hf_config = model_config_to_llama_config(cfg)  # refuses before any weight is read
    origin = f"{ARCHITECTURES[hf_config['model_type']]} export"
    tensors = params_to_links(model_params(model), llama_links(cfg), origin=origin, out_in=True)
    return tensors, hf_config
