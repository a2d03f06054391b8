"""Checkpoint tensors <-> jaxformer parameters through tables of `Link`s, read in both directions.

jaxformer stores each block stack's parameters stacked on a leading layer axis and its kernels as
(in, out). A Link names one checkpoint key (a per-layer key holds "{i}") and the jaxformer path(s)
it fills; several paths mean one packed tensor split along its (in, out) last axis (GPT-2's c_attn,
torch's in_proj: q, k, v). Every converter (bert.py, gpt2.py, llama.py, torch_transformer.py) is a
Link table plus config checks; the checking, stacking, splitting and assignment live here once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from jaxformer.config import RUNTIME, ModelConfig
from jaxformer.errors import UserError
from jaxformer.models import build_model


class InteropError(UserError):
    """A folder, checkpoint or config that cannot be mapped; the message is one line."""


# Hugging Face `hidden_act` / `activation_function` names that jaxformer computes exactly
HF_ACTIVATIONS = {
    "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu", "silu": "silu", "swish": "silu", "sigmoid": "sigmoid",
}
# and back: the Hugging Face name of each jaxformer activation (config.json on export)
HF_EXPORT_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu",
                         "sigmoid": "sigmoid"}

# ModelConfig fields that change how a model runs, never what it computes: safe to override
RUNTIME_FIELDS = ModelConfig.fields_with_role(RUNTIME)


def require(origin: str, field: str, value, allowed: Iterable, hint: str = "") -> None:
    """Refuse `value` unless it is one of `allowed`: one line naming origin, field and choices."""
    allowed = tuple(allowed)
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise InteropError(
            f"{origin}: {field}={value!r} is not supported (supported: {choices}){hint}"
        )


def make_config(origin: str, overrides: Mapping, **fields) -> ModelConfig:
    """A ModelConfig from converted `fields` plus run-time `overrides`; errors name `origin`."""
    unknown = sorted(set(overrides) - set(RUNTIME_FIELDS))
    if unknown:
        raise InteropError(f"{origin}: cannot override {', '.join(unknown)} on import (it changes "
                           f"the computation); only {', '.join(RUNTIME_FIELDS)} may be overridden")
    try:
        return ModelConfig(**{**fields, **overrides})
    except UserError as err:
        raise InteropError(f"{origin}: {err}") from err


@dataclass(frozen=True)
class Link:
    params: tuple[str, ...]  # jaxformer paths; several = packed along the tensor's last (out) axis
    key: str  # checkpoint key; with n_layers, a template holding "{i}"
    n_layers: int = 0  # 0: a single tensor; else one tensor per layer, stacked on axis 0

    @property
    def is_kernel(self) -> bool:
        return self.params[0].endswith(".kernel")


def linear(params: str | Sequence[str], key: str, n_layers: int = 0, *,
           suffixes: tuple[str, str] = (".weight", ".bias"), bias: bool = True) -> list[Link]:
    """kernel <- weight, bias <- bias (unless `bias=False`) of one Linear (or of several packed
    into one tensor)."""
    prefixes = (params,) if isinstance(params, str) else tuple(params)
    links = [Link(tuple(f"{p}.{leaf}" for p in prefixes), key + suffix, n_layers)
             for leaf, suffix in zip(("kernel", "bias"), suffixes)]
    return links if bias else links[:1]


def norm(params: str, key: str, n_layers: int = 0, *, bias: bool = True) -> list[Link]:
    """scale <- weight, bias <- bias of one LayerNorm (an RMSNorm, `bias=False`: scale only)."""
    links = [Link((f"{params}.scale",), f"{key}.weight", n_layers),
             Link((f"{params}.bias",), f"{key}.bias", n_layers)]
    return links if bias else links[:1]


def param_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    return {path: tuple(leaf.shape) for path, leaf in _flat_state(model)[1].items()}


def model_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters as float32 numpy arrays keyed by dotted path (the export format)."""
    return {path: np.asarray(jax.device_get(leaf), np.float32)
            for path, leaf in _flat_state(model)[1].items()}


def _flat_state(model: nnx.Module):
    """(the model's Param State, its leaves keyed by dotted path)."""
    state = nnx.state(model, nnx.Param)
    return state, traverse_util.flatten_dict(state.to_pure_dict(), sep=".")


def links_to_params(
    tensors: Mapping[str, np.ndarray], links: Sequence[Link], shapes: Mapping[str, tuple],
    *, origin: str, out_in: bool, ignore: str = "",
) -> dict[str, np.ndarray]:
    """Gather, transpose (`out_in`: torch's (out, in) weights), split and stack checkpoint tensors
    into jaxformer params, checking each against `shapes`; leftover tensors not matching the regex
    `ignore` are refused, so no weight is silently dropped."""
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in tensors:
            raise InteropError(f"{origin}: tensor {key!r} is missing from the checkpoint")
        used.add(key)
        return np.asarray(tensors[key])

    params: dict[str, np.ndarray] = {}
    for link in links:
        keys = [link.key.format(i=i) for i in range(link.n_layers)] if link.n_layers else [link.key]
        splits = [split_packed(take(k).T if out_in and link.is_kernel else take(k), link, origin)
                  for k in keys]
        for j, path in enumerate(link.params):
            value = np.stack([s[j] for s in splits]) if link.n_layers else splits[0][j]
            if path not in shapes:
                raise InteropError(f"{origin}: {link.key} maps to {path}, which this model lacks")
            if value.shape != shapes[path]:
                raise InteropError(f"{origin}: {link.key} -> {path} has shape {value.shape} but "
                                   f"the model config expects {shapes[path]}")
            params[path] = value
    leftover = sorted(k for k in tensors
                      if k not in used and not (ignore and re.fullmatch(ignore, k)))
    if leftover:
        raise InteropError(f"{origin}: {len(leftover)} tensor(s) have no place in the jaxformer "
                           f"model, e.g. {', '.join(leftover[:3])}")
    return params


def split_packed(tensor: np.ndarray, link: Link, origin: str) -> list[np.ndarray]:
    """One array per path of `link`: equal slices of the tensor's last axis."""
    if tensor.shape[-1] % len(link.params):
        raise InteropError(f"{origin}: {link.key} has shape {tensor.shape}, which does not split "
                           f"into {len(link.params)} equal parts ({', '.join(link.params)})")
    return np.split(tensor, len(link.params), axis=-1)


def params_to_links(params: Mapping[str, np.ndarray], links: Sequence[Link], *, origin: str,
                    out_in: bool) -> dict[str, np.ndarray]:
    """The inverse of `links_to_params`: unstack, pack and transpose params into checkpoint tensors.
    Every param must be covered by a link, so an export never drops a weight."""
    uncovered = sorted(set(params) - {p for link in links for p in link.params})
    if uncovered:
        raise InteropError(f"{origin}: parameter(s) {', '.join(uncovered[:3])} have no checkpoint "
                           "counterpart")
    tensors: dict[str, np.ndarray] = {}
    for link in links:
        values = [params[p] for p in link.params]
        for i in range(link.n_layers) if link.n_layers else [None]:
            packed = np.concatenate([v if i is None else v[i] for v in values], axis=-1)
            key = link.key if i is None else link.key.format(i=i)
            tensors[key] = np.ascontiguousarray(packed.T if out_in and link.is_kernel else packed)
    return tensors


def assign_params(model: nnx.Module, params: Mapping[str, np.ndarray], *,
                  origin: str) -> nnx.Module:
    """Write `params` (dotted paths, shapes already checked) into `model`, which may be abstract
    (from nnx.eval_shape); every parameter must be given."""
    state, current = _flat_state(model)
    missing = sorted(p for p in current if p not in params)
    if missing:
        raise InteropError(f"{origin}: nothing in the checkpoint fills {', '.join(missing[:3])}")
    pure = {p: jnp.asarray(params[p], leaf.dtype) for p, leaf in current.items()}
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(pure, sep="."))
    nnx.update(model, state)
    return model


def fresh_params(cfg: ModelConfig, seed: int, prefixes: tuple[str, ...]) -> dict[str, jax.Array]:
    """Initial values of only the params under `prefixes`: under jit, XLA drops every other
    initialiser (an eager build_model compiles and runs them all: seconds for a BERT)."""
    if not prefixes:
        return {}

    @jax.jit
    def init() -> dict[str, jax.Array]:
        flat = _flat_state(build_model(cfg, seed))[1]
        return {path: leaf for path, leaf in flat.items() if path.startswith(prefixes)}

    return init()


def params_from_tensors(
    cfg: ModelConfig, tensors: Mapping[str, np.ndarray], links: Sequence[Link], *, origin: str,
    out_in: bool, ignore: str = "",
) -> dict[str, np.ndarray]:
    """The params of `cfg` that checkpoint `tensors` fill through `links` (dotted paths, checked
    shapes); params no link fills are absent."""
    shapes = param_shapes(nnx.eval_shape(lambda: build_model(cfg, 0)))  # shapes only
    return links_to_params(tensors, links, shapes, origin=origin, out_in=out_in, ignore=ignore)


def model_from_params(cfg: ModelConfig, params: Mapping[str, np.ndarray], *, origin: str,
                      keep_init: tuple[str, ...] = (), seed: int = 0) -> nnx.Module:
    """The model of `cfg` holding `params`; params under `keep_init` (heads or embeddings the
    checkpoint lacks) are freshly initialised from `seed` unless given."""
    model = nnx.eval_shape(lambda: build_model(cfg, seed))  # nothing allocated yet
    return assign_params(model, {**fresh_params(cfg, seed, keep_init), **params}, origin=origin)


def model_from_tensors(
    cfg: ModelConfig, tensors: Mapping[str, np.ndarray], links: Sequence[Link], *, origin: str,
    out_in: bool, ignore: str = "", keep_init: tuple[str, ...] = (), seed: int = 0,
) -> nnx.Module:
    """The model of `cfg` filled from checkpoint `tensors` through `links`; params under `keep_init`
    are freshly initialised from `seed` where the checkpoint lacks them."""
    params = params_from_tensors(cfg, tensors, links, origin=origin, out_in=out_in, ignore=ignore)
    return model_from_params(cfg, params, origin=origin, keep_init=keep_init, seed=seed)
