"""Log lines parse with Megatron-LM-style regexes; TensorBoard gets the scalars; wandb stays optional."""

import glob
import math
import re
import subprocess
import sys
from pathlib import Path

from megatron.training.logging import TensorBoardWriter, format_train_line, format_validation_line

# What users' Megatron log parsers match.
TRAIN_RE = re.compile(
    r"^ iteration\s+(?P<it>\d+)/\s*(?P<total>\d+) \| consumed samples:\s+(?P<samples>\d+) \| "
    r"elapsed time per iteration \(ms\): (?P<ms>[\d.]+) \| learning rate: (?P<lr>[\d.]+E[+-]\d+) \| "
    r"global batch size:\s+(?P<gbs>\d+) \| lm loss: (?P<loss>[\d.]+E[+-]\d+) \|"
    r"(?P<extra>(?: [a-z ]+: [\d.]+E[+-]\d+ \|)*)"
    r" loss scale: (?P<scale>[\d.]+) \| grad norm: (?P<gn>[\d.]+) \| number of skipped iterations:\s+(?P<sk>\d+) \| "
    r"number of nan iterations:\s+(?P<nan>\d+) \| tokens per second: (?P<tps>[\d.]+) \| "
    r"TFLOP/s: (?P<tflops>[\d.]+) \| MFU: (?P<mfu>[\d.]+)% \|$")
VALID_RE = re.compile(r"^ validation loss at iteration (\d+) \| lm loss value: ([\d.]+E[+-]\d+) \| "
                      r"lm loss PPL: ([\d.]+E[+-]\d+) \|")


def _line(**overrides):
    kw = dict(iteration=10, train_iters=100, consumed_samples=320, elapsed_ms=123.44, learning_rate=3e-4,
              global_batch_size=32, metrics={"lm loss": 5.123456}, grad_norm=1.2344, skipped_iterations=0,
              nan_iterations=0, tokens_per_second=1234.54, tflops_per_device=0.0512, mfu=0.301)
    kw.update(overrides)
    return format_train_line(**kw)


def test_train_line_is_megatrons_format_exactly():
    assert _line() == (
        " iteration       10/     100 | consumed samples:          320 | elapsed time per iteration (ms): 123.4 |"
        " learning rate: 3.000000E-04 | global batch size:    32 | lm loss: 5.123456E+00 | loss scale: 1.0 |"
        " grad norm: 1.234 | number of skipped iterations:   0 | number of nan iterations:   0 |"
        " tokens per second: 1234.5 | TFLOP/s: 0.05 | MFU: 30.1% |")


def test_train_line_parses_with_extra_losses():
    line = _line(metrics={"lm loss": 4.25, "budget loss": 0.0125, "gate mean": 0.5}, iteration=12345,
                 train_iters=500000)
    m = TRAIN_RE.match(line)
    assert m, line
    assert (int(m["it"]), int(m["total"]), float(m["loss"]), float(m["gn"])) == (12345, 500000, 4.25, 1.234)
    assert m["extra"] == " budget loss: 1.250000E-02 | gate mean: 5.000000E-01 |"
    assert float(m["mfu"]) == 30.1 and float(m["lr"]) == 3e-4


def test_validation_line_has_value_and_perplexity():
    line = format_validation_line(100, {"lm loss": 4.5, "gate mean": 0.25})
    m = VALID_RE.match(line)
    assert m, line
    assert int(m[1]) == 100 and float(m[2]) == 4.5
    assert math.isclose(float(m[3]), math.exp(4.5), rel_tol=1e-6)
    assert line.endswith("gate mean value: 2.500000E-01 |") and "gate mean PPL" not in line
    assert "PPL: 4.851652E+08" in format_validation_line(1, {"lm loss": 50.0})  # exp capped at 20


def test_tensorboard_writer_writes_events(tmp_path):
    writer = TensorBoardWriter(str(tmp_path))
    writer.train(10, 320, 3e-4, {"lm loss": 5.0}, 1.0, 1000.0, 0.1, 0.3)
    writer.validation(10, 320, {"lm loss": 4.0})
    writer.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(glob.glob(str(tmp_path / "events.out.tfevents.*"))[0])
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"lm loss", "learning-rate", "grad-norm", "tokens-per-second", "mfu", "lm loss validation",
            "lm loss validation ppl"} <= tags
    assert events.Scalars("lm loss validation")[0].value == 4.0


def test_training_does_not_import_wandb():
    # A fresh interpreter: this one may have imported wandb for another test.
    code = ("import sys, megatron.training.trainer, megatron.training.arguments; "
            "assert 'wandb' not in sys.modules, 'wandb imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
