"""The test session's environment: wandb off, XLA's quick-compile settings, and one persistent XLA
compilation cache that every test and subprocess shares. Shared helpers live in tests/helpers.py."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# One persistent XLA cache for the session, subprocesses included: the many tiny runs compile the
# same few programs, and a cache hit skips the compile (JAX reads these before it starts).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jaxformer-xla-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# The tests check behaviour on tiny shapes, where XLA:CPU's compile is most of each test's time:
# compile without backend optimisation and with the classic fusion emitters (a tiny train step:
# 4.3 s -> 0.8 s; docs/performance.md, "The test suite"). Numerics are XLA's either way, up to
# float rounding. JAXFORMER_TEST_XLA_DEFAULTS=1 runs the suite with XLA's own defaults.
QUICK_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
if os.environ.get("JAXFORMER_TEST_XLA_DEFAULTS") != "1" and \
        QUICK_COMPILE_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {QUICK_COMPILE_FLAGS}".strip()
