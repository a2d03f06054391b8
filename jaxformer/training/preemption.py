"""When to write a checkpoint besides the regular interval: preemption and elapsed time.

SIGTERM (cluster preemption, `kill`, SLURM time limit) and SIGINT (Ctrl-C) do not kill a run: the
handler only records the signal; the loop saves a checkpoint at the end of the current step and
exits cleanly, and rerunning the same command resumes there. With several processes, JAX's
preemption sync point (which `jax.distributed` arms for SIGTERM) picks a step all processes
reach, so they save together.
"""

from __future__ import annotations

import signal
import time
from types import FrameType

import jax
import numpy as np
from jax.experimental import multihost_utils

HANDLED = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint; rerun the command to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention for "ended by signal signum"


class SaveTriggers:
    """Signals and a wall-clock interval that ask for an extra checkpoint (`checkpoint_minutes`)."""

    def __init__(self, checkpoint_minutes: float | None = None):
        self.interval_s = None if checkpoint_minutes is None else 60.0 * checkpoint_minutes
        self.last_save = time.monotonic()
        self.signal: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> SaveTriggers:
        for signum in HANDLED:
            try:
                self.previous[signum] = signal.signal(signum, self._record)
            except ValueError:  # not the main thread (e.g. a test runner's worker): no handler
                pass
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else "preemption notice"

    def preempted(self, step: int) -> bool:
        """Stop after saving this step? Multi-process: every process answers True at one step."""
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signal is not None

    def time_to_save(self) -> bool:
        """checkpoint_minutes elapsed since the last save (process 0's clock decides for all)."""
        if self.interval_s is None:
            return False
        due = np.asarray(time.monotonic() - self.last_save >= self.interval_s)
        if jax.process_count() > 1:
            due = multihost_utils.broadcast_one_to_all(due)
        return bool(due)

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def forward(self) -> None:
        """After the checkpoint: hand the signal to whatever handled it before (a launcher such
        as submitit requeues the job from there)."""
        handler = self.previous.get(self.signal) if self.signal else None
        if callable(handler):
            handler(self.signal, None)
