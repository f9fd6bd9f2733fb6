"""Suite-wide settings.

Tests use tiny models, for which one thread is as fast as two; and several test processes (the
multi-process tests, subprocesses of the e2e tests) share this 2-core machine, where
oversubscribed OpenMP threads slow small matmuls down by orders of magnitude.
"""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the subprocesses tests start
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
