"""Progress of long work (training steps, evaluated problems): a tqdm bar on a terminal, and off
one (a log file, a pipe, a SLURM job) one plain line per report. A bar's redraws are carriage
returns: a redirected log of a long run would hold thousands of them on a few very long lines.
"""

from __future__ import annotations

import sys
import time
from typing import IO

from tqdm import tqdm


def is_terminal(stream: IO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty (some wrappers), or a closed stream
        return False


class Progress:
    """`total` units of work, `initial` of them done before (a resumed run). `update(n)` counts
    work done; `report(key=value, ...)` shows the latest values: beside the bar on a terminal,
    else as the line `train 120/1500 steps, loss=1.2345, tok_s=5120, elapsed 00:42, ETA 08:03`.
    Off a terminal nothing else is printed, so a line per report is a line per log interval."""

    def __init__(self, total: int, *, initial: int = 0, desc: str, unit: str,
                 enabled: bool = True, stream: IO | None = None):
        self.stream = stream or sys.stderr  # where tqdm draws its bar
        self.total, self.initial, self.done = total, initial, initial
        self.desc, self.unit = desc, unit
        self.started = time.monotonic()
        self.lines = enabled and not is_terminal(self.stream)
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                        file=self.stream, disable=self.lines or not enabled)

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)

    def report(self, **values: str) -> None:
        if self.lines:
            print(self.line(values), file=self.stream, flush=True)
        elif values:
            self.bar.set_postfix(values)

    def line(self, values: dict[str, str]) -> str:
        elapsed = time.monotonic() - self.started
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        eta = tqdm.format_interval((self.total - self.done) / rate) if rate > 0 else "?"
        fields = [f"{self.desc} {self.done}/{self.total} {self.unit}s",
                  *(f"{key}={value}" for key, value in values.items()),
                  f"elapsed {tqdm.format_interval(elapsed)}", f"ETA {eta}"]
        return ", ".join(fields)

    @staticmethod
    def write(message: str) -> None:
        """A line on stdout, above the bar when one is drawn (whatever `enabled` says)."""
        tqdm.write(message)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
