"""What a run records about where it ran: git SHA, library versions, devices."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

import jax

LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "hydra-core", "wandb")


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
            text=True, timeout=5, check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def run_metadata() -> dict:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    devices = jax.devices()
    return {
        "git_sha": git_sha(),
        "versions": versions,
        "devices": {"platform": devices[0].platform, "count": len(devices),
                    "kind": devices[0].device_kind, "processes": jax.process_count()},
    }
