"""What the log lines report: forward_step's metrics summed over micro-batches and averaged over
data-parallel ranks (`add_metrics`, `average`), and per log interval with the throughput and MFU
of its train steps (`Interval`). The lines themselves and TensorBoard/wandb: logging.py."""

import math

import torch
import torch.distributed as dist

from megatron.models.loss import LM_LOSS
from megatron.parallel.layout import Parallelized
from megatron.training.flops import BestPeak, FixedPeak


def average(sums: dict[str, torch.Tensor], count: int, par: Parallelized) -> dict[str, float]:
    """Means over `count` local contributions and over the data-parallel ranks, as floats."""
    if not sums:
        return {}
    names = list(sums)
    values = torch.stack([sums[n].detach().float().reshape(()) for n in names]) / count
    if par.dp_size > 1:
        dist.all_reduce(values, group=par.dp_group)  # SUM: gloo has no AVG
        values /= par.dp_size
    return dict(zip(names, values.tolist()))


def add_metrics(sums: dict, metrics: dict):
    for name, value in metrics.items():
        value = torch.as_tensor(value).detach().float()
        sums[name] = sums[name] + value if name in sums else value


class Interval:
    """What one log line reports: metrics averaged over the iterations since the last line (skipped
    ones included: their loss was computed), and throughput over the time spent in train steps
    (evaluation and checkpointing excluded)."""

    def __init__(self, tokens_per_iteration: int, flops_per_token: float, world_size: int,
                 peak: FixedPeak | BestPeak | None):
        self.tokens_per_iteration = tokens_per_iteration
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak = peak
        self._reset()

    def _reset(self):
        self.sums, self.seconds, self.iterations, self.skipped, self.nan = {}, 0.0, 0, 0, 0

    def add(self, metrics: dict[str, float], seconds: float, applied: bool):
        add_metrics(self.sums, metrics)
        self.seconds += seconds
        self.iterations += 1
        self.skipped += not applied
        self.nan += not math.isfinite(metrics.get(LM_LOSS, 0.0))

    def close(self) -> tuple[dict[str, float], dict]:
        averaged = {name: float(value) / self.iterations for name, value in self.sums.items()}
        tokens_per_second = self.iterations * self.tokens_per_iteration / self.seconds
        flops_per_device = tokens_per_second * self.flops_per_token / self.world_size
        mfu, peak_note = self.peak.mfu(flops_per_device) if self.peak else (None, None)
        throughput = {
            "elapsed_ms": 1000.0 * self.seconds / self.iterations,
            "tokens_per_second": tokens_per_second,
            "tflops_per_device": flops_per_device / 1e12,
            "mfu": mfu,
            "peak_note": peak_note,  # a log field when the peak changed, else None
            "skipped": self.skipped,
            "nan": self.nan,
        }
        self._reset()
        return averaged, throughput
