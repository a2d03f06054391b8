"""Reports read from run directories (through jaxformer/runs.py), never from a model:
`compare.py` groups runs by what differs between their configs and pools their seeds;
`write_rows_csv` is the one-row-per-run CSV the studies' analysis scripts write."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path


def write_rows_csv(path: Path, columns: Sequence[str], rows: Iterable[dict]) -> None:
    """`rows` as a CSV of `columns` (keys beyond them are left out), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
