"""Hugging Face / PyTorch weight import and export (safetensors and numpy only; no torch import).

- BERT folders -> Encoder: `load_hf_encoder`, `bert_to_encoder`, `bert_config_to_model_config`
- GPT-2, Llama, Qwen3 folders <-> Decoder: `load_hf_decoder` (dispatching on config.json's
  model_type: gpt2 | llama | qwen3), `save_hf_decoder` (GPT-2, or Llama / Qwen3 for RMSNorm, glu,
  rope, qk-norm decoders); on state dicts `gpt2_to_decoder` / `decoder_to_gpt2` and
  `llama_to_decoder` / `decoder_to_llama` (both Llama and Qwen3)
- `read_hf_encoder` / `read_hf_decoder`: (config, the params a folder holds, tokenizer), no model
- torch.nn.Transformer -> EncoderDecoder: `torch_transformer_to_encoder_decoder`
Anything that does not map raises `InteropError` (a ValueError) with one line naming the field.
"""

from jaxformer.interop.bert import (
    bert_config_to_model_config, bert_to_encoder, load_hf_encoder, read_hf_encoder,
)
from jaxformer.interop.gpt2 import (
    decoder_to_gpt2, gpt2_config_to_model_config, gpt2_to_decoder, model_config_to_gpt2_config,
)
from jaxformer.interop.hf_decoder import (
    DECODER_TYPES, load_hf_decoder, read_hf_decoder, save_hf_decoder,
)
from jaxformer.interop.llama import (
    decoder_to_llama, llama_config_to_model_config, llama_to_decoder, model_config_to_llama_config,
)
from jaxformer.interop.params import InteropError
from jaxformer.interop.torch_transformer import torch_transformer_to_encoder_decoder

__all__ = [
    "DECODER_TYPES", "InteropError",
    "bert_config_to_model_config", "bert_to_encoder", "load_hf_encoder", "read_hf_encoder",
    "decoder_to_gpt2", "gpt2_config_to_model_config", "gpt2_to_decoder",
    "model_config_to_gpt2_config",
    "decoder_to_llama", "llama_config_to_model_config", "llama_to_decoder",
    "model_config_to_llama_config",
    "load_hf_decoder", "read_hf_decoder", "save_hf_decoder",
    "torch_transformer_to_encoder_decoder",
]
