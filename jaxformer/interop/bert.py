"""BERT checkpoints (BertModel, BertForMaskedLM; e.g. all-MiniLM-L6-v2) -> jaxformer Encoder.

BERT is the encoder with norm="post", a LayerNorm after the embeddings, no final norm, learned
absolute positions and token types. HF Linear weights are (out, in), so kernels are transposed.
The pooler is dropped (the Encoder's classifier exists only with num_classes > 0); the MLM head
(cls.predictions) is loaded when the checkpoint has it, else left newly initialised.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import numpy as np
from tokenizers import Tokenizer

from jaxformer.config import ModelConfig
from jaxformer.interop.params import (
    HF_ACTIVATIONS, InteropError, Link, linear, make_config, model_from_params, norm,
    params_from_tensors, require,
)
from jaxformer.interop.safetensors_io import (
    read_hf_config, read_safetensors, require_file, weight_files,
)
from jaxformer.models.encoder import Encoder

# checkpoint tensors with no jaxformer counterpart: buffers, the pooler, the NSP head, the MLM
# decoder (tied to the word embeddings; its bias duplicates cls.predictions.bias)
IGNORED = (r"embeddings\.position_ids|pooler\..*|cls\.seq_relationship\..*"
           r"|cls\.predictions\.decoder\..*")
MLM_BIAS = "cls.predictions.bias"
NEW_HEADS = ("mlm_head.", "classifier.")  # freshly initialised where the checkpoint lacks them


def bert_config_to_model_config(hf_config: dict, origin: str = "config.json",
                                **overrides) -> ModelConfig:
    """The Encoder config that computes what a Hugging Face BERT config does (or InteropError).

    `overrides` may set run-time switches only (scan_layers, attention, dtype, dropout)."""
    hint = (": load_hf_encoder reads BERT folders (GPT-2, Llama, Qwen3 go to load_hf_decoder; "
            "RoBERTa's padding-offset positions are not supported)")
    require(origin, "model_type", hf_config.get("model_type"), ("bert",), hint)
    require(origin, "position_embedding_type", hf_config.get("position_embedding_type", "absolute"),
            ("absolute",), ": relative position embeddings have no jaxformer counterpart")
    require(origin, "hidden_act", hf_config.get("hidden_act", "gelu"), HF_ACTIVATIONS)
    for flag in ("is_decoder", "add_cross_attention"):
        require(origin, flag, hf_config.get(flag, False), (False,),
                ": only bidirectional encoders map")
    missing = [k for k in ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers",
                           "intermediate_size", "max_position_embeddings") if k not in hf_config]
    if missing:
        raise InteropError(f"{origin}: lacks {', '.join(missing)}, needed to build the encoder")
    fields = dict(
        kind="encoder", vocab_size=hf_config["vocab_size"], d_model=hf_config["hidden_size"],
        n_heads=hf_config["num_attention_heads"], n_layers=hf_config["num_hidden_layers"],
        d_ff=hf_config["intermediate_size"], max_len=hf_config["max_position_embeddings"],
        activation=HF_ACTIVATIONS[hf_config.get("hidden_act", "gelu")], positions="learned",
        norm="post", embed_norm=True, final_norm=False, bias=True, residual=True,
        layer_norm_eps=hf_config.get("layer_norm_eps", 1e-12),
        type_vocab_size=hf_config.get("type_vocab_size", 2),
        dropout=hf_config.get("hidden_dropout_prob", 0.1),  # no attention-prob dropout in jaxformer
    )
    return make_config(origin, overrides, **fields)


def bert_links(cfg: ModelConfig, with_mlm_head: bool) -> list[Link]:
    n, layer, blocks = cfg.n_layers, "encoder.layer.{i}.", "stack.blocks."
    links = [
        Link(("embed.embedding",), "embeddings.word_embeddings.weight"),
        Link(("embeddings.positions.embedding",), "embeddings.position_embeddings.weight"),
        *norm("embeddings.norm", "embeddings.LayerNorm"),
        *[link for name in ("query", "key", "value")
          for link in linear(blocks + f"attention.{name}", layer + f"attention.self.{name}", n)],
        *linear(blocks + "attention.out", layer + "attention.output.dense", n),
        *norm(blocks + "attention_branch.norm", layer + "attention.output.LayerNorm", n),
        *linear(blocks + "mlp.up", layer + "intermediate.dense", n),
        *linear(blocks + "mlp.down", layer + "output.dense", n),
        *norm(blocks + "mlp_branch.norm", layer + "output.LayerNorm", n),
    ]
    if cfg.type_vocab_size:
        links.append(Link(("embeddings.token_types",), "embeddings.token_type_embeddings.weight"))
    if with_mlm_head:
        links += [*linear("mlm_head.transform", "cls.predictions.transform.dense"),
                  *norm("mlm_head.norm", "cls.predictions.transform.LayerNorm"),
                  Link(("mlm_head.bias",), MLM_BIAS)]
    return links


def canonical_bert_names(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop the "bert." prefix (BertFor* checkpoints) and rename old TF-era LayerNorm gamma/beta."""
    renamed = {}
    for key, value in state_dict.items():
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key.removeprefix("bert."))
        renamed[re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)] = value
    return renamed


def bert_params(state_dict: Mapping[str, np.ndarray], hf_config: dict, *,
                origin: str = "BERT checkpoint", **overrides) -> tuple[ModelConfig, dict]:
    """(Encoder config, the params the checkpoint holds: dotted paths -> numpy arrays). The MLM
    head is among them only when the checkpoint has one (BertForMaskedLM)."""
    cfg = bert_config_to_model_config(hf_config, origin, **overrides)
    tensors = canonical_bert_names(state_dict)
    links = bert_links(cfg, with_mlm_head=MLM_BIAS in tensors)
    return cfg, params_from_tensors(cfg, tensors, links, origin=origin, out_in=True,
                                    ignore=IGNORED)


def bert_to_encoder(state_dict: Mapping[str, np.ndarray], hf_config: dict, *, seed: int = 0,
                    origin: str = "BERT checkpoint", **overrides) -> Encoder:
    """An Encoder holding a BERT checkpoint's weights (numpy state dict, HF names)."""
    cfg, params = bert_params(state_dict, hf_config, origin=origin, **overrides)
    return model_from_params(cfg, params, origin=origin, keep_init=NEW_HEADS, seed=seed)


def read_hf_encoder(model_dir: str | Path,
                    **overrides) -> tuple[ModelConfig, dict[str, np.ndarray], Tokenizer]:
    """(Encoder config, the params the folder holds, tokenizer) of a BERT folder: config.json,
    model.safetensors, tokenizer.json. Every check on the folder runs before weights are read."""
    hf_config = read_hf_config(model_dir)
    bert_config_to_model_config(hf_config, f"{model_dir}/config.json", **overrides)
    files = weight_files(model_dir)
    tokenizer_path = require_file(model_dir, "tokenizer.json", "the Hugging Face tokenizers file")
    cfg, params = bert_params(read_safetensors(files), hf_config, origin=str(model_dir),
                              **overrides)
    return cfg, params, Tokenizer.from_file(str(tokenizer_path))


def load_hf_encoder(model_dir: str | Path, *, seed: int = 0,
                    **overrides) -> tuple[Encoder, Tokenizer]:
    """(Encoder, tokenizer) from a BERT folder: config.json, model.safetensors, tokenizer.json.

    The tokenizer is returned as stored (its own padding/truncation settings)."""
    cfg, params, tokenizer = read_hf_encoder(model_dir, **overrides)
    model = model_from_params(cfg, params, origin=str(model_dir), keep_init=NEW_HEADS, seed=seed)
    return model, tokenizer
