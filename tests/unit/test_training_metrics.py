"""What a log line reports: metric means over micro-batches and iterations, skipped and nan
iterations, throughput and MFU."""

import math

import pytest
import torch

from megatron.parallel.layout import Parallelized
from megatron.training.flops import BestPeak
from megatron.training.metrics import Interval, add_metrics, average


def test_metrics_are_summed_as_tensors_and_averaged_as_floats():
    sums = {}
    add_metrics(sums, {"lm loss": torch.tensor(1.0), "twice": 2.0})
    add_metrics(sums, {"lm loss": torch.tensor(3.0), "twice": 6.0})
    assert average(sums, 2, Parallelized(torch.nn.Linear(1, 1))) == {"lm loss": 2.0, "twice": 4.0}
    assert average({}, 2, Parallelized(torch.nn.Linear(1, 1))) == {}


def test_interval_counts_skipped_and_nan_iterations_then_starts_afresh():
    interval = Interval(tokens_per_iteration=100, flops_per_token=1e9, world_size=2, peak=None)
    interval.add({"lm loss": 1.0}, seconds=0.5, applied=True)
    interval.add({"lm loss": math.nan}, seconds=1.5, applied=False)
    averaged, throughput = interval.close()
    assert math.isnan(averaged["lm loss"])
    assert (throughput["skipped"], throughput["nan"], throughput["mfu"]) == (1, 1, None)
    assert throughput["elapsed_ms"] == 1000.0 and throughput["tokens_per_second"] == 100.0
    assert throughput["tflops_per_device"] == pytest.approx(100.0 * 1e9 / 2 / 1e12)
    interval.add({"lm loss": 2.0}, seconds=1.0, applied=True)
    averaged, throughput = interval.close()
    assert averaged == {"lm loss": 2.0} and (throughput["skipped"], throughput["nan"]) == (0, 0)


def test_log_interval_reports_mfu_against_the_best_peak_and_names_a_new_one():
    interval = Interval(tokens_per_iteration=100, flops_per_token=1e9, world_size=1, peak=BestPeak(2e13))
    interval.add({"lm loss": 1.0}, seconds=0.01, applied=True)  # 1e13 FLOP/s
    assert interval.close()[1]["mfu"] == 0.5
    interval.add({"lm loss": 1.0}, seconds=0.004, applied=True)  # 2.5e13 FLOP/s: beat the peak
    throughput = interval.close()[1]
    assert throughput["mfu"] == 1.0 and throughput["peak_note"].startswith("MFU peak: 25.000 TFLOP/s")
