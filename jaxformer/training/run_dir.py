"""What training writes into its run directory besides metrics and checkpoints: writability, a
lock against two runs writing into one directory, and the marker a finished run leaves so a
relaunched sweep skips it (jaxformer/runs.py reads it)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from jaxformer.errors import UserError
from jaxformer.runs import FINISHED, LOCK


def check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_probe"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"run dir {run_dir} is not writable ({err.strerror}): set hydra.run.dir to a writable path"
        ) from err


class RunLock:
    """An exclusive flock on RUN_DIR/.lock, held while the run trains. The kernel drops it when
    the process dies (SIGKILL included), so a crashed run never blocks its own resume."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.file = None

    def __enter__(self) -> RunLock:
        self.file = self.path.open("a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise UserError(
                f"run dir {self.path.parent} is in use by {holder}: wait for that run, or set "
                "another hydra.run.dir") from err
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def write_finished(run_dir: Path, record: dict) -> None:
    """Atomically (write + rename), so a marker is whole or absent."""
    path = Path(run_dir) / FINISHED
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
