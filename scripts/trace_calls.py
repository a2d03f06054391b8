"""Which jaxformer files `python -m jaxformer.train` passes through, in the main thread, before
its first call of the attention function, and how often it switches between them: a measure of
how far a reader travels from the entry point to attention (docs/architecture.md). Functions only
count (not module or class bodies, lambdas or comprehensions). From the repository root:

    python scripts/trace_calls.py experiment=quickstart trainer.steps=1 hydra.run.dir=/tmp/trace
"""

from __future__ import annotations

import os
import runpy
import sys
from collections import Counter
from pathlib import Path

ROOT = str(Path("jaxformer").resolve()) + os.sep
TARGET = ("models/attention.py", "dot_product_attention")
CO_OPTIMIZED = 0x1  # set on function code objects, not on module or class bodies


class Reached(Exception):
    pass


def main() -> None:
    calls: list[str] = []  # the file of every jaxformer function call, in order

    def tracer(frame, event, arg):
        code = frame.f_code
        if event != "call" or not code.co_filename.startswith(ROOT):
            return None
        if code.co_name.startswith("<") or not code.co_flags & CO_OPTIMIZED:
            return None
        path = "jaxformer/" + code.co_filename[len(ROOT):]
        calls.append(path)
        if path.endswith(TARGET[0]) and code.co_name == TARGET[1]:
            raise Reached
        return None

    sys.argv = ["jaxformer.train", *sys.argv[1:]]
    sys.settrace(tracer)
    try:
        runpy.run_module("jaxformer.train", run_name="__main__")
    except (Reached, SystemExit):
        pass
    finally:
        sys.settrace(None)
    visits = Counter(path for i, path in enumerate(calls) if i == 0 or calls[i - 1] != path)
    print(f"first attention call after {len(calls)} jaxformer calls: {len(visits)} files, "
          f"{sum(visits.values())} file switches")
    print("files (visits):", ", ".join(f"{path} ({n})" for path, n in visits.most_common()))


if __name__ == "__main__":
    main()
