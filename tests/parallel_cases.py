"""The runs tests/test_parallel.py compares across meshes (shared with tests/multidevice_runs.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import REPO, replace, tiny_config

# family -> (model.kind, task)
FAMILIES = {"decoder": ("decoder", "addition"), "encoder": ("encoder", "addition"),
            "encoder_decoder": ("encoder_decoder", "reverse")}
MESHES = {
    "data8": {"data": 8},
    "data4_fsdp2": {"data": 4, "fsdp": 2},
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
}


def family_config(family: str, steps: int = 4, mesh: dict | None = None, **trainer):
    """A tiny run of `family`: 2 heads and d_ff 64 split over tensor=2, batch 16 over 8 ways."""
    kind, task = FAMILIES[family]
    # no evaluation: the runs compare training losses, and 8-device eval compiles are costly
    # one checkpoint, at the last step (the resume tests need no other): an 8-device save of
    # replicated arrays costs seconds of slicing on CPU
    cfg = tiny_config(steps=steps, log_every=1, eval_every=0, checkpoint_every=1000,
                      keep_checkpoints=5, num_samples=0, **trainer)
    # a constant learning rate: a 4-step run is then the first 4 steps of a 6-step run
    return replace(cfg, model={"kind": kind}, optim={"schedule": "constant", "warmup_steps": 0},
                   task={"name": task, "max_length": 4, "eval_size": 16},
                   mesh={"data": -1, "fsdp": 1, "tensor": 1, **(mesh or {})})


def read_losses(metrics_path: Path) -> dict[int, float]:
    """step -> train loss from a run's metrics.jsonl."""
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def multidevice_env(devices: int) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}

