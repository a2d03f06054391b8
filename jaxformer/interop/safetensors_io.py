"""Hugging Face model folders on disk: config.json and safetensors weights, read to / written from
numpy. Weights are read from safetensors only (never pickled `pytorch_model.bin`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxformer.interop.params import InteropError

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # sharded checkpoints: tensor name -> shard file


def require_file(model_dir: str | Path, name: str, purpose: str) -> Path:
    path = Path(model_dir) / name
    if not path.is_file():
        raise InteropError(f"{model_dir}: no {name} in the folder ({purpose})")
    return path


def read_hf_config(model_dir: str | Path) -> dict:
    if not Path(model_dir).is_dir():
        raise InteropError(f"{model_dir}: not a folder; pass a Hugging Face model folder")
    path = require_file(model_dir, "config.json", "the model's Hugging Face config")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InteropError(f"{path}: not valid JSON ({err})") from err


def weight_files(model_dir: str | Path) -> list[Path]:
    """The folder's safetensors files (one, or its index's shards); only checks they exist."""
    model_dir = Path(model_dir)
    if (model_dir / WEIGHTS).is_file():
        return [model_dir / WEIGHTS]
    if (model_dir / WEIGHTS_INDEX).is_file():
        weight_map = json.loads((model_dir / WEIGHTS_INDEX).read_text())["weight_map"]
        return [require_file(model_dir, shard, f"a shard named in {WEIGHTS_INDEX}")
                for shard in sorted(set(weight_map.values()))]
    pickled = ""
    if (model_dir / "pytorch_model.bin").exists():
        pickled = " (pytorch_model.bin is a pickle and is never read: re-save it with safetensors)"
    raise InteropError(f"{model_dir}: no {WEIGHTS} (or {WEIGHTS_INDEX}) in the folder{pickled}")


def read_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
    """Every tensor of the files as numpy. numpy has no bfloat16 (the dtype Llama and Qwen3 ship):
    those tensors are read through jax on the CPU, as ml_dtypes bfloat16 arrays."""
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        with safe_open(path, framework="numpy") as f:
            names = f.keys()
            bf16 = {k for k in names if f.get_slice(k).get_dtype() == "BF16"}
            tensors.update({k: f.get_tensor(k) for k in names if k not in bf16})
        if bf16:
            with jax.default_device(jax.devices("cpu")[0]), safe_open(path, framework="flax") as f:
                tensors.update({k: np.asarray(f.get_tensor(k)) for k in bf16})
    return tensors


def write_hf_folder(out_dir: str | Path, hf_config: Mapping,
                    tensors: Mapping[str, np.ndarray]) -> Path:
    """config.json + model.safetensors, the layout `from_pretrained` reads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    # transformers refuses safetensors files whose metadata lacks a framework "format"
    save_file(dict(tensors), out_dir / WEIGHTS, metadata={"format": "pt"})
    return out_dir
