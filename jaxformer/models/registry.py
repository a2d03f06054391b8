"""model.kind -> model class; the one place that maps config to a model."""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.errors import UserError
from jaxformer.models.decoder import Decoder
from jaxformer.models.encoder import Encoder
from jaxformer.models.encoder_decoder import EncoderDecoder
from jaxformer.models.mlp import MLPClassifier

MODELS = {"encoder": Encoder, "decoder": Decoder, "encoder_decoder": EncoderDecoder,
          "mlp": MLPClassifier}


def resolve_model_config(cfg: ModelConfig, vocab_size: int | None, num_classes: int = 0,
                         input_dim: int | None = None) -> ModelConfig:
    """Fill `vocab_size` from the tokenizer (None for vector tasks), `num_classes` from a
    classification task and `input_dim` from a vector task, refusing a config that disagrees."""
    if cfg.input_dim is not None and input_dim is not None and cfg.input_dim != input_dim:
        raise UserError(
            f"model.input_dim={cfg.input_dim} but the task gives {input_dim} features: "
            "set model.input_dim=null to take it from the task"
        )
    if cfg.vocab_size is not None and vocab_size is not None and cfg.vocab_size < vocab_size:
        raise UserError(
            f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's {vocab_size} tokens: "
            "set model.vocab_size=null to take it from the tokenizer"
        )
    if num_classes and cfg.num_classes not in (0, num_classes):
        raise UserError(
            f"model.num_classes={cfg.num_classes} but the task has {num_classes} classes: "
            "set model.num_classes=0 to take it from the task"
        )
    return dataclasses.replace(
        cfg, vocab_size=cfg.vocab_size or vocab_size, num_classes=num_classes or cfg.num_classes,
        input_dim=cfg.input_dim or input_dim,
    )


def build_model(cfg: ModelConfig, seed: int) -> nnx.Module:
    return MODELS[cfg.kind](cfg, rngs=nnx.Rngs(params=seed))


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, params, rest): rest holds non-trainable state (empty for the current models)."""
    return nnx.split(model, nnx.Param, ...)


def count_params(params: nnx.State) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(params))
