"""Model families built from shared layers; `build_model` maps a ModelConfig to a module."""

from jaxformer.models.registry import (
    MODELS, build_model, count_params, resolve_model_config, split_model,
)

__all__ = ["MODELS", "build_model", "count_params", "resolve_model_config", "split_model"]
