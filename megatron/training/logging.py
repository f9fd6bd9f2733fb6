"""Training and validation log lines in Megatron-LM's format, and the same scalars for
TensorBoard and Weights & Biases.

The lines keep Megatron-LM's field names, order and number formats so existing log parsers work:

 iteration       10/     100 | consumed samples:          320 | elapsed time per iteration (ms): 123.4 |
 learning rate: 3.000000E-04 | global batch size:    32 | lm loss: 5.123456E+00 | loss scale: 1.0 |
 grad norm: 1.234 | number of skipped iterations:   0 | number of nan iterations:   0 |
 tokens per second: 1234.5 | TFLOP/s: 0.05 | MFU: 30.1% |

(one line). Every logged metric (the entry point's forward_step names them: "lm loss", and e.g.
RETRO's "budget loss") is printed as `name: %.6E |` after the global batch size, as Megatron
does with its loss dict. Throughput fields come last: tokens per second over the whole job,
TFLOP/s and MFU per device (Megatron's "throughput per GPU").

 validation loss at iteration 100 | lm loss value: 4.500000E+00 | lm loss PPL: 9.001713E+01 |

prints `value` for every metric and `PPL` for the language-model loss.
"""

import math
import os

from megatron.training.config import LoggingConfig


def format_train_line(*, iteration: int, train_iters: int, consumed_samples: int, elapsed_ms: float,
                      learning_rate: float, global_batch_size: int, metrics: dict[str, float],
                      grad_norm: float | None, skipped_iterations: int, nan_iterations: int,
                      tokens_per_second: float, tflops_per_device: float, mfu: float | None,
                      loss_scale: float = 1.0) -> str:
    parts = [
        f" iteration {iteration:8d}/{train_iters:8d}",
        f"consumed samples: {consumed_samples:12d}",
        f"elapsed time per iteration (ms): {elapsed_ms:.1f}",
        f"learning rate: {learning_rate:.6E}",
        f"global batch size: {global_batch_size:5d}",
    ]
    parts += [f"{name}: {value:.6E}" for name, value in metrics.items()]
    parts.append(f"loss scale: {loss_scale:.1f}")
    if grad_norm is not None:
        parts.append(f"grad norm: {grad_norm:.3f}")
    parts += [
        f"number of skipped iterations: {skipped_iterations:3d}",
        f"number of nan iterations: {nan_iterations:3d}",
        f"tokens per second: {tokens_per_second:.1f}",
        f"TFLOP/s: {tflops_per_device:.2f}",
    ]
    if mfu is not None:
        parts.append(f"MFU: {100.0 * mfu:.1f}%")
    return " | ".join(parts) + " |"


def perplexity(loss: float) -> float:
    return math.exp(min(20.0, loss))  # Megatron caps the exponent so a diverged loss stays printable


def format_validation_line(iteration: int, metrics: dict[str, float], lm_loss_name: str = "lm loss",
                           suffix: str = "") -> str:
    """`suffix` names the split in end-of-training lines, e.g. " on validation set"."""
    parts = [f" validation loss at iteration {iteration}{suffix}"]
    for name, value in metrics.items():
        parts.append(f"{name} value: {value:.6E}")
        if name == lm_loss_name:
            parts.append(f"{name} PPL: {perplexity(value):.6E}")
    return " | ".join(parts) + " |"


class ScalarWriter:
    """The trainer's two calls, turned into Megatron's scalars under its tag names; a subclass says
    where they go (`_write`) and how its run ends (`close`)."""

    def train(self, iteration: int, consumed_samples: int, learning_rate: float, metrics: dict[str, float],
              grad_norm: float | None, tokens_per_second: float, tflops_per_device: float, mfu: float | None):
        scalars = {"learning-rate": learning_rate, **metrics}
        if grad_norm is not None:
            scalars["grad-norm"] = grad_norm
        scalars["tokens-per-second"] = tokens_per_second
        scalars["throughput-tflops-per-device"] = tflops_per_device
        if mfu is not None:
            scalars["mfu"] = mfu
        self._write(iteration, consumed_samples, scalars, vs_samples=["learning-rate", *metrics])

    def validation(self, iteration: int, consumed_samples: int, metrics: dict[str, float],
                   lm_loss_name: str = "lm loss"):
        scalars = {}
        for name, value in metrics.items():
            scalars[f"{name} validation"] = value
            if name == lm_loss_name:
                scalars[f"{name} validation ppl"] = perplexity(value)
        self._write(iteration, consumed_samples, scalars, vs_samples=[f"{name} validation" for name in metrics])

    def _write(self, iteration: int, consumed_samples: int, scalars: dict[str, float], vs_samples: list[str]):
        """`scalars` at step `iteration`; Megatron also plots those named in `vs_samples` against
        the consumed samples."""
        raise NotImplementedError

    def close(self):
        raise NotImplementedError


class TensorBoardWriter(ScalarWriter):
    """Only built where --tensorboard-dir is given (lazy import, so runs without it need no
    tensorboard package)."""

    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir, max_queue=100)

    def _write(self, iteration, consumed_samples, scalars, vs_samples):
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, iteration)
        for tag in vs_samples:
            self.writer.add_scalar(f"{tag} vs samples", scalars[tag], consumed_samples)

    def close(self):
        self.writer.close()


class WandbWriter(ScalarWriter):
    """The same scalars in a Weights & Biases run, as Megatron's --wandb-* flags set it up; wandb is
    imported here only, so runs without --wandb-project need no wandb package."""

    def __init__(self, project: str, name: str, save_dir: str | None, config: dict):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("--wandb-project needs the wandb package: pip install wandb") from e
        if save_dir:
            os.makedirs(save_dir, exist_ok=True)
        self.run = wandb.init(project=project, name=name, dir=save_dir, config=config)

    def _write(self, iteration, consumed_samples, scalars, vs_samples):
        # A W&B run has a single step axis, so instead of TensorBoard's "vs samples" copies it gets
        # the sample count (Megatron's W&B tag) to choose as the x-axis.
        self.run.log({**scalars, "samples vs steps": consumed_samples}, step=iteration)

    def close(self):
        self.run.finish()


class Writers(ScalarWriter):
    """Every enabled writer behind the trainer's calls; with none, the calls do nothing."""

    def __init__(self, writers: list[ScalarWriter]):
        self.writers = writers

    def _write(self, *args, **kwargs):
        for writer in self.writers:
            writer._write(*args, **kwargs)

    def close(self):
        for writer in self.writers:
            writer.close()


def build_writers(lg: LoggingConfig, checkpoint_dir: str | None, run_config: dict) -> Writers:
    """The writers the logging section `lg` asks for. W&B's files go to --wandb-save-dir, else to
    <--save>/wandb as in Megatron, else where wandb puts them by default ($WANDB_DIR or ./wandb)."""
    writers = []
    if lg.tensorboard_dir:
        writers.append(TensorBoardWriter(lg.tensorboard_dir))
    if lg.wandb_project:
        save_dir = lg.wandb_save_dir or (os.path.join(checkpoint_dir, "wandb") if checkpoint_dir else None)
        writers.append(WandbWriter(lg.wandb_project, lg.wandb_exp_name, save_dir, run_config))
    return Writers(writers)
