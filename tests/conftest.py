"""Shared fixtures: tiny configs so every compiled step takes milliseconds."""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# One persistent XLA cache for the session, subprocesses included: the many tiny runs compile the
# same few programs, and a cache hit skips the compile (JAX reads these before it starts).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jaxformer-xla-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

REPO = Path(__file__).resolve().parent.parent

from jaxformer.config import (  # noqa: E402
    LoggerConfig, ModelConfig, TaskConfig, TrainConfig, TrainerConfig, WandbConfig,
)


def tiny_config(**trainer_overrides) -> TrainConfig:
    trainer = dict(steps=6, batch_size=16, log_every=1, eval_every=3, checkpoint_every=3,
                   eval_batch_size=32, num_samples=2, progress=False)
    trainer.update(trainer_overrides)
    return TrainConfig(
        model=ModelConfig(d_model=32, n_heads=2, n_layers=2, d_ff=64, max_len=16,
                          positions="learned"),
        task=TaskConfig(max_digits=2, eval_size=32),
        trainer=TrainerConfig(**trainer),
        logger=LoggerConfig(wandb=WandbConfig(mode="disabled")),
    )


@pytest.fixture
def tiny():
    return tiny_config


def replace(config, **sections):
    """`replace(cfg, model={'d_model': 64})`: a copy with some section fields changed."""
    return dataclasses.replace(
        config, **{name: dataclasses.replace(getattr(config, name), **fields)
                   for name, fields in sections.items()}
    )


def run_module(module: str, *args: str, cwd: Path = REPO, timeout: int = 300):
    """Run `python -m module args` as a user would; returns the CompletedProcess."""
    import subprocess

    env = {**os.environ, "WANDB_MODE": "disabled", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
