"""Fine-tuning on 8 devices, for tests/test_transfer.py (not a test module itself).

`python tests/multidevice_finetune.py SOURCE_RUN OUT_DIR` runs under
XLA_FLAGS=--xla_force_host_platform_device_count=8 and trains test_transfer's fine-tuning config
(init_from SOURCE_RUN, the lowest block frozen) on the data=2 fsdp=2 tensor=2 mesh into OUT_DIR.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import SHARDED, finetuned_config, replace  # noqa: E402

from jaxformer.training.loop import train  # noqa: E402

if __name__ == "__main__":
    assert jax.device_count() == 8, f"expected 8 devices, got {jax.device_count()}"
    train(replace(finetuned_config(Path(sys.argv[1])), mesh=SHARDED), Path(sys.argv[2]))
