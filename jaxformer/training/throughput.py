"""The peak MFU is measured against: a datasheet's for known accelerators, a measured one on CPU.

MFU = model FLOPs per step (models/flops.py) / step time / (peak per device x devices). On GPUs
and TPUs the peak is the chip's dense bfloat16 matmul rate (the convention of PaLM and MaxText,
whatever dtype the run computes in); on a CPU, which has no datasheet number worth the name,
it is the fastest of a few float32 matmuls measured once at the start of the run.
`trainer.peak_flops` overrides either.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp

# device_kind substring -> dense bf16 FLOP/s per chip (vendor datasheets). The first match wins,
# so the more specific names come first.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("V100", 125e12),  # float16 (no bfloat16 units)
    ("TPU v3", 123e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
)


@dataclass(frozen=True)
class Peak:
    flops_per_device: float
    devices: int
    source: str  # where the number comes from, recorded with the run

    @property
    def flops(self) -> float:
        return self.flops_per_device * self.devices


def datasheet_peak(device_kind: str) -> float | None:
    return next((flops for name, flops in PEAK_BF16_FLOPS if name in device_kind), None)


@functools.cache
def measured_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an n x n float32 matmul on the default device, the fastest of `repeats` (a peak,
    and the least noisy statistic on a shared machine). Measured once per process: the host does
    not change between the runs of one process (a sweep's jobs in one launcher, a test session),
    and each measurement costs a compile (~1 s on 8 CPU devices)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times)


def device_peak(override: float | None = None) -> Peak:
    """The peak of this run's devices (all of them, every process's)."""
    device = jax.devices()[0]
    devices = jax.device_count()
    if override is not None:
        return Peak(override, devices, "trainer.peak_flops")
    listed = datasheet_peak(device.device_kind)
    if listed is not None:
        return Peak(listed, devices, f"datasheet bf16 peak of {device.device_kind}")
    if device.platform == "cpu":  # one measurement spans the host's cores, however many
        #                            devices XLA splits them into: one peak per process
        return Peak(measured_matmul_peak(), jax.process_count(),
                    "measured float32 matmul (1024 x 1024), per host")
    return Peak(0.0, devices, f"unknown for {device.device_kind}: set trainer.peak_flops")
