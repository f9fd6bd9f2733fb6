"""The peak FLOP/s that MFU divides the trained FLOPs by (those are counted beside the models:
`gpt_flops_per_token` in megatron/models/gpt/flops.py, `retro_flops_per_token` in
megatron/models/retro/model.py).

The peak (`mfu_peak`): --peak-tflops if given; else on a GPU of the table below its datasheet
dense peak for the dtype; else the best matmul rate seen on this machine, measured at start-up
and, on CPU, again every REMEASURE_EVERY log lines: one measurement taken while something else
loads the machine is too low, and MFU against it exceeded 100%.
"""

import re
import time
from typing import Callable

import torch


def measure_matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32,
                              seconds: float = 1.0) -> float:
    """Best observed FLOP/s of square matmuls on `device` over about `seconds`.

    Uses its own generator so measuring leaves the global RNG streams (and thus training) alone.
    """
    device = torch.device(device)
    if device.type == "cuda":
        n = 8192
    else:
        # CPUs without native bf16/fp16 units are 100x slower there: keep one matmul well under a second.
        n = 1024 if dtype == torch.float32 else 256
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.rand(n, n, generator=gen, device=device).to(dtype)
    b = torch.rand(n, n, generator=gen, device=device).to(dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.mm(a, b)  # warm-up: allocation, kernel choice
    sync()
    best = 0.0
    deadline = time.perf_counter() + seconds
    runs = 0
    while runs < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        elapsed = time.perf_counter() - start
        best = max(best, 2.0 * n ** 3 / elapsed)
        runs += 1
    return best


# Nominal peaks in TFLOP/s, from NVIDIA's datasheets: dense figures, not the 2:4-sparsity ones
# (half the "with sparsity" figure where a datasheet gives only that). Columns: bf16 tensor
# cores, TF32 tensor cores (fp32 matmuls under torch.backends.cuda.matmul.allow_tf32), plain
# fp32 (fp32 matmuls otherwise, PyTorch's default); None where the part has no such units.
# Names are matched as whole words, first match wins: "A10" is neither "A100" nor "A10G", and a
# variant comes before the name it contains ("NVIDIA H100 PCIe" before the SXM "NVIDIA H100 80GB HBM3").
_NOMINAL_TFLOPS = (
    ("H100 PCIe", 756.5, 378.0, 51.0),
    ("H100 NVL|H200 NVL", 835.5, 417.5, 60.0),
    ("H100|H200|GH200", 989.5, 494.5, 67.0),
    ("A100", 312.0, 156.0, 19.5),
    ("A30", 165.0, 82.0, 10.3),
    ("A10", 125.0, 62.5, 31.2),
    ("L40S", 362.05, 183.0, 91.6),
    ("L40", 181.05, 90.5, 90.5),
    ("L4", 121.0, 60.0, 30.3),
    ("V100S", None, None, 16.4),
    ("V100-PCIE", None, None, 14.0),
    ("V100", None, None, 15.7),
    ("T4", None, None, 8.1),
)

# Log lines between CPU re-measurements, and the length of one: four 1024^3 matmuls, outside the
# timed steps, about 50 ms on an idle 2-core CPU (200 GFLOP/s), 0.2 s when it is busy.
REMEASURE_EVERY = 10
REMEASURE_SECONDS = 0.05


def nominal_peak_flops(device_name: str, dtype: torch.dtype, tf32: bool = False) -> float | None:
    """Datasheet dense FLOP/s of `dtype` matmuls (fp32 at the TF32 rate if `tf32`) on the GPU
    called `device_name` (torch.cuda.get_device_name); None if the table does not know it."""
    for pattern, bf16, tf32_rate, fp32 in _NOMINAL_TFLOPS:
        if re.search(rf"\b(?:{pattern})\b", device_name, re.IGNORECASE):
            rate = {torch.bfloat16: bf16, torch.float32: tf32_rate if tf32 and tf32_rate else fp32}.get(dtype)
            return None if rate is None else rate * 1e12
    return None


class FixedPeak:
    """A peak that is known (--peak-tflops, a datasheet): MFU against it as it is."""

    def __init__(self, flops: float):
        self.flops = flops

    def mfu(self, achieved_flops: float) -> tuple[float, str | None]:
        return achieved_flops / self.flops, None


class BestPeak:
    """The best rate seen: the highest measurement, re-measured every `remeasure_every` calls
    when `remeasure` is given, or a log interval's own rate when it beat all of them (its
    matmuls ran at least that fast), so MFU never exceeds 1. `mfu` also returns a log field
    naming the new peak when it changed."""

    def __init__(self, flops: float, remeasure: Callable[[], float] | None = None,
                 remeasure_every: int = REMEASURE_EVERY):
        self.flops, self.remeasure, self.remeasure_every = flops, remeasure, remeasure_every
        self._calls = 0

    def mfu(self, achieved_flops: float) -> tuple[float, str | None]:
        self._calls += 1
        why = None
        if self.remeasure is not None and self._calls % self.remeasure_every == 0:
            measured = self.remeasure()
            if measured > self.flops:
                self.flops, why = measured, "re-measured"
        if achieved_flops > self.flops:
            self.flops, why = achieved_flops, "this interval's steps beat every measurement"
        note = f"MFU peak: {self.flops / 1e12:.3f} TFLOP/s ({why})" if why else None
        return achieved_flops / self.flops, note


def mfu_peak(device: torch.device, dtype: torch.dtype,
             peak_tflops: float | None = None) -> tuple[FixedPeak | BestPeak, str | None]:
    """The peak MFU is reported against on `device` for `dtype` matmuls, and a start-up log line
    saying which one it is (None for --peak-tflops, which the user chose)."""
    if peak_tflops is not None:
        return FixedPeak(peak_tflops * 1e12), None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
        precision = "tf32" if tf32 else str(dtype).removeprefix("torch.")
        nominal = nominal_peak_flops(name, dtype, tf32)
        if nominal is not None:
            return FixedPeak(nominal), (f" > MFU against the nominal dense {precision} peak of {name}: "
                                        f"{nominal / 1e12:.1f} TFLOP/s (datasheet; --peak-tflops overrides)")
        # Measured once only: re-measuring mid-run would allocate the 8192^2 operands beside training's memory.
        measured = measure_matmul_peak_flops(device, dtype)
        return BestPeak(measured), (f" > measured {precision} matmul peak of {device}: {measured / 1e12:.3f} TFLOP/s "
                                    f"(used for MFU: no nominal {precision} peak known for '{name}'; "
                                    "--peak-tflops overrides)")
    measured = measure_matmul_peak_flops(device, dtype)
    best = BestPeak(measured, remeasure=lambda: measure_matmul_peak_flops(device, dtype, seconds=REMEASURE_SECONDS))
    return best, (f" > measured {dtype} matmul peak of {device}: {measured / 1e12:.3f} TFLOP/s (used for MFU; "
                  f"re-measured every {REMEASURE_EVERY} log lines, the best rate seen kept)")
