"""What `python -m jaxformer.evaluate checkpoint=RUN_DIR text='notes/*.md'` does: the bits per
byte of any text under a decoder run, overall and per document (each matched file is one
document), written to OUT/text_scores.json (OUT: out_dir, default the run dir).
"""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path

from jaxformer.errors import UserError
from jaxformer.inference.api import load_run


def score_files(checkpoint: str, pattern: str, step: int | None, out_dir: Path) -> dict:
    """{"bpb", "nats", "bytes", "tokens", "documents": [{"path", "bpb", ...}]} of the files
    `pattern` matches (a glob; `**` recurses), in path order."""
    paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not paths:
        raise UserError(f"text={pattern} matches no file: give a text file or a glob of them")
    run = load_run(checkpoint, step)
    documents = []
    for path in paths:
        text = path.read_bytes().decode("utf-8", errors="replace")
        if text.strip():
            documents.append({"path": str(path), **run.score(text)})
    if not documents:
        raise UserError(f"text={pattern} matches only empty files: nothing to score")
    nats, n_bytes = (sum(doc[key] for doc in documents) for key in ("nats", "bytes"))
    summary = {"checkpoint": str(Path(checkpoint).absolute()), "step": run.step,
               "bpb": nats / (math.log(2) * n_bytes), "nats": nats, "bytes": n_bytes,
               "tokens": sum(doc["tokens"] for doc in documents), "documents": documents}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "text_scores.json").write_text(json.dumps(summary, indent=1) + "\n")
    except OSError as err:
        raise UserError(f"out_dir={out_dir} is not writable ({err.strerror}): choose another "
                        "out_dir") from err
    return summary
