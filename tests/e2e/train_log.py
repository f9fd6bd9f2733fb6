"""Reading the trainer's Megatron-style log lines back, for the end-to-end tests."""

import re

ITER_RE = re.compile(r"^ iteration\s+(\d+)/\s*\d+ \| consumed samples:\s+(\d+) \| .*? \| learning rate: (\S+) \| "
                     r"global batch size:\s+\d+ \| lm loss: (\S+) \| .*?grad norm: (\S+) \|", re.M)
VALID_RE = re.compile(r"^ validation loss at iteration (\d+).*?\| lm loss value: (\S+) \|", re.M)


def iterations(log: str) -> dict[int, tuple]:
    """iteration -> (consumed samples, learning rate, lm loss, grad norm) as printed."""
    return {int(m[1]): m.groups()[1:] for m in ITER_RE.finditer(log)}
