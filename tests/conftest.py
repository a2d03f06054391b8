"""The test session's environment: wandb off, and one persistent XLA compilation cache that every
test and subprocess shares. Shared helpers live in tests/helpers.py."""

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
