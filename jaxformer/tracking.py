"""Trackers: where metrics go. One protocol, three sinks (wandb, a local JSONL mirror, nothing),
and what a run records about where it ran (git SHA, library versions, devices).

Each `log` call writes one record: `{"step": ..., "split": "train" | "eval", **metrics}`.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

WANDB_ID_FILE = "wandb_run_id"  # in the run dir: a resumed job continues its wandb run
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "hydra-core", "wandb")


class Tracker(Protocol):
    def log(self, metrics: dict[str, Any], step: int, split: str) -> None: ...
    def summary(self, values: dict[str, Any]) -> None: ...
    def finish(self) -> None: ...


class JsonlTracker:
    """Appends to `metrics.jsonl`; on resume, drops records past the restored step so the file
    reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = Path(path)
        if resume_step and self.path.exists():
            kept = [
                line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = self.path.open("a")

    def log(self, metrics: dict[str, Any], step: int, split: str) -> None:
        self.file.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
        self.file.flush()

    def summary(self, values: dict[str, Any]) -> None:
        self.log(values, values.get("step", 0), "summary")

    def finish(self) -> None:
        self.file.close()


class WandbTracker:
    """A wandb run; its id is kept in the run dir's `wandb_run_id` so a resumed job continues it.
    `settings`: mode, project, entity and dir (WandbConfig.resolved: config > environment)."""

    def __init__(self, run_dir: Path, settings: dict[str, Any], group: str, name: str,
                 tags: list[str], config: dict[str, Any]):
        import wandb

        id_file = Path(run_dir) / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        Path(settings["dir"]).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=settings["project"], entity=settings["entity"], group=group, name=name,
            tags=list(tags), config=config, dir=str(settings["dir"]), mode=settings["mode"],
            id=run_id, resume="allow",
            settings=wandb.Settings(quiet=True, console="off", x_disable_stats=True),
        )

    @property
    def location(self) -> str:
        return str(Path(self.run.dir).parent)

    def log(self, metrics: dict[str, Any], step: int, split: str) -> None:
        self.run.log({f"{split}/{key}": value for key, value in metrics.items()}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update(values)

    def finish(self) -> None:
        self.run.finish()


class MultiTracker:
    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, metrics: dict[str, Any], step: int, split: str) -> None:
        for tracker in self.trackers:
            tracker.log(metrics, step, split)

    def summary(self, values: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.summary(values)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


# -- where a run ran ------------------------------------------------------------------------------
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
    """Git SHA, library versions and devices: part of every run's wandb config."""
    import jax

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
