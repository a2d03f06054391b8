"""Hugging Face causal-LM folders <-> Decoder: picks the converter by config.json's model_type
(gpt2: gpt2.py; llama, qwen3: llama.py) and, on export, by what the decoder config computes."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, NamedTuple

import numpy as np
from tokenizers import Tokenizer

from jaxformer.config import ModelConfig
from jaxformer.interop.gpt2 import decoder_to_gpt2, gpt2_config_to_model_config, gpt2_params
from jaxformer.interop.llama import decoder_to_llama, llama_config_to_model_config, llama_params
from jaxformer.interop.params import model_from_params, require
from jaxformer.interop.safetensors_io import (
    read_hf_config, read_safetensors, weight_files, write_hf_folder,
)
from jaxformer.models.decoder import Decoder


class Family(NamedTuple):
    config: Callable[..., ModelConfig]  # (hf_config, origin, **overrides) -> ModelConfig
    # (state_dict, hf_config, *, origin, **overrides) -> (ModelConfig, params)
    params: Callable[..., tuple[ModelConfig, dict]]


FAMILIES: Mapping[str, Family] = {
    "gpt2": Family(gpt2_config_to_model_config, gpt2_params),
    "llama": Family(llama_config_to_model_config, llama_params),
    "qwen3": Family(llama_config_to_model_config, llama_params),
}
DECODER_TYPES = tuple(FAMILIES)  # the model_types load_hf_decoder reads


def family_of(hf_config: dict, origin: str) -> Family:
    model_type = hf_config.get("model_type")
    require(origin, "model_type", model_type, DECODER_TYPES,
            ": load_hf_decoder maps causal LMs; BERT folders go to load_hf_encoder")
    return FAMILIES[model_type]


def read_hf_decoder(model_dir: str | Path,
                    **overrides) -> tuple[ModelConfig, dict[str, np.ndarray], Tokenizer | None]:
    """(Decoder config, its params, the folder's tokenizer.json if any) of a GPT-2, Llama or Qwen3
    folder (config.json + safetensors). Checks run before weights are read."""
    hf_config = read_hf_config(model_dir)
    family = family_of(hf_config, f"{model_dir}/config.json")
    family.config(hf_config, f"{model_dir}/config.json", **overrides)
    files = weight_files(model_dir)
    cfg, params = family.params(read_safetensors(files), hf_config, origin=str(model_dir),
                                **overrides)
    tokenizer_path = Path(model_dir) / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(tokenizer_path)) if tokenizer_path.is_file() else None
    return cfg, params, tokenizer


def load_hf_decoder(model_dir: str | Path, *, seed: int = 0, **overrides) -> Decoder:
    """A Decoder from a GPT-2, Llama or Qwen3 folder (config.json + safetensors); the ModelConfig
    is `gpt2_config_to_model_config` / `llama_config_to_model_config` of its config.json.
    `overrides`: run-time switches (e.g. scan_layers=False). Checks run before weights are read."""
    cfg, params, _ = read_hf_decoder(model_dir, **overrides)
    return model_from_params(cfg, params, origin=str(model_dir), seed=seed)


def is_llama_shaped(cfg: ModelConfig) -> bool:
    """Whether a decoder exports as Llama / Qwen3 (RMSNorm, gated MLP, rope, qk norm) rather than
    as GPT-2; the exporter then refuses, in one line, whatever else it cannot express."""
    return (cfg.norm_type == "rmsnorm" or cfg.mlp == "glu" or cfg.positions == "rope"
            or cfg.qk_norm)


def decoder_to_hf(model: Decoder, cfg: ModelConfig) -> tuple[dict[str, np.ndarray], dict]:
    """(state dict, config.json dict) of the Hugging Face architecture the decoder config is."""
    return (decoder_to_llama if is_llama_shaped(cfg) else decoder_to_gpt2)(model, cfg)


def save_hf_decoder(model: Decoder, cfg: ModelConfig, out_dir: str | Path, tokenizer=None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer.json when a `tokenizers.Tokenizer` is
    given) that `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads: a
    GPT2LMHeadModel, or a LlamaForCausalLM (Qwen3ForCausalLM with qk_norm) for RMSNorm / glu /
    rope decoders."""
    tensors, hf_config = decoder_to_hf(model, cfg)
    out_dir = write_hf_folder(out_dir, hf_config, tensors)
    if tokenizer is not None:
        tokenizer.save(str(out_dir / "tokenizer.json"))
    return out_dir
