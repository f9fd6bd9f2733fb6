"""End to end on stdlib text: corpus -> tokenizer -> indexed dataset -> pretrain_gpt.py.

Three runs of the same 40-iteration job (log interval 1, checkpoints at 20 and 40):
  A  uninterrupted;
  B  killed while saving iteration 40 (tests/kill_during_save.py), so only iteration 20 is complete;
  C  `--load` of B's directory: must resume from 20, ignore the half-written save and reproduce
     A's iterations 21-40 to the last printed digit, ending with weights bit-identical to A's.
Dropout is on, so the resume is exact only if the RNG states come back too.
Plus a 2-process torchrun run, whose losses match one process to float tolerance.
"""

import os
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

import pytest
import torch

from kill_during_save import EXIT_CODE as KILL_EXIT_CODE
from megatron.training.checkpointing import TRACKER_FILE
from train_log import VALID_RE, iterations as _iterations
from tools.corpus_from_files import write_corpus
from tools.preprocess_data import preprocess
from tools.train_tokenizer import train_tokenizer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _train_args(data: Path, *extra) -> list[str]:
    return [
        "--data-path", str(data / "corpus_text_document"), "--split", "80,20,0",
        "--data-cache-path", str(data / "cache"),
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(data / "tok"),
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
        "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "40",
        "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "5", "--lr-decay-style", "cosine",
        "--log-interval", "1", "--eval-interval", "10", "--eval-iters", "2",
        "--peak-tflops", "1", *extra,
    ]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    # One thread per process: these matrices are tiny, and on a busy machine two OpenMP threads
    # spin against other processes and run many times slower.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _pretrain(data: Path, save: Path, *extra, kill_at: int | None = None) -> subprocess.CompletedProcess:
    """kill_at: the iteration whose save is killed once DCP has written it (tests/kill_during_save.py)."""
    killer = [] if kill_at is None else [str(REPO / "tests" / "kill_during_save.py"), str(kill_at)]
    # Dropout makes every step draw from the RNG, so an exact resume needs the RNG state restored.
    return _run([sys.executable, *killer, "pretrain_gpt.py",
                 *_train_args(data, "--save", str(save), "--save-interval", "20", "--hidden-dropout", "0.1",
                              "--attention-dropout", "0.1", *extra)])


def _weights(checkpoint: Path, out: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(checkpoint, out)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpt_e2e")
    stdlib = sysconfig.get_paths()["stdlib"]
    written, _ = write_corpus(os.path.join(stdlib, "email"), "*.py", str(root / "corpus.jsonl"))
    assert written >= 20
    train_tokenizer(str(root / "corpus.jsonl"), ["text"], 512, str(root / "tok"))
    preprocess(str(root / "corpus.jsonl"), str(root / "corpus"), ["text"],
               {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": str(root / "tok")}, append_eod=True)
    return root


@pytest.fixture(scope="module")
def runs(data):
    a = _pretrain(data, data / "A", "--tensorboard-dir", str(data / "tb"))
    assert a.returncode == 0, a.stdout[-3000:] + a.stderr[-3000:]
    b = _pretrain(data, data / "B", kill_at=40)
    b_after_kill = sorted(os.listdir(data / "B"))
    c = _pretrain(data, data / "B", "--load", str(data / "B"))
    assert c.returncode == 0, c.stdout[-3000:] + c.stderr[-3000:]
    return {"A": a, "B": b, "B_after_kill": b_after_kill, "C": c}


def test_uninterrupted_run_logs_trains_and_checkpoints(data, runs):
    log = runs["A"].stdout
    iters = _iterations(log)
    assert sorted(iters) == list(range(1, 41))
    assert iters[40][0] == "320"  # consumed samples = 40 x global batch 8
    losses = [float(iters[i][2]) for i in range(1, 41)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert [int(m[1]) for m in VALID_RE.finditer(log)] == [10, 20, 30, 40]
    assert sorted(os.listdir(data / "A")) == ["iter_0000020", "iter_0000040", TRACKER_FILE]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(data / "tb"))


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(data, runs):
    b = runs["B"]
    assert b.returncode == KILL_EXIT_CODE, b.stderr[-3000:]
    assert _iterations(b.stdout) == _iterations(runs["A"].stdout)  # same job, same numbers
    after = runs["B_after_kill"]
    assert "iter_0000020" in after and "iter_0000040" not in after
    assert [n for n in after if n.startswith("iter_0000040.tmp-")], after
    # C (run after the kill) loaded 20, not the half-written 40, and cleaned the debris up.
    assert "loaded checkpoint" in runs["C"].stdout and "at iteration 20" in runs["C"].stdout
    assert sorted(os.listdir(data / "B")) == ["iter_0000020", "iter_0000040", TRACKER_FILE]
    assert (data / "B" / TRACKER_FILE).read_text() == "40\n"


def test_resume_reproduces_the_uninterrupted_run_exactly(data, runs):
    full, resumed = _iterations(runs["A"].stdout), _iterations(runs["C"].stdout)
    assert sorted(resumed) == list(range(21, 41))
    assert resumed == {i: full[i] for i in range(21, 41)}
    valid_full = [m.groups() for m in VALID_RE.finditer(runs["A"].stdout)]
    assert [m.groups() for m in VALID_RE.finditer(runs["C"].stdout)] == valid_full[2:]
    # Printed digits could hide a last-bit difference; the final states cannot.
    a = _weights(data / "A" / "iter_0000040", data / "a.pt")
    c = _weights(data / "B" / "iter_0000040", data / "c.pt")
    assert a["train_state"] == c["train_state"]
    for group in ("model", "optimizer"):
        flat_a, flat_c = _flatten(a[group]), _flatten(c[group])
        assert flat_a.keys() == flat_c.keys()
        for key, value in flat_a.items():
            assert torch.equal(value, flat_c[key]) if torch.is_tensor(value) else value == flat_c[key], key


def _flatten(tree, prefix="") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix: tree}


def test_torchrun_data_parallel_matches_one_process(data):
    # Without dropout: two ranks draw their masks from separate (equally seeded) generators.
    args = _train_args(data, "--exit-interval", "5", "--eval-iters", "0")
    run = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "pretrain_gpt.py", *args])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    single = _run([sys.executable, "pretrain_gpt.py", *args])
    assert single.returncode == 0, single.stderr[-3000:]
    two, one = _iterations(run.stdout), _iterations(single.stdout)
    assert "data-parallel size 2" in run.stdout
    assert sorted(two) == sorted(one) == [1, 2, 3, 4, 5]  # printed once (by the last rank), not per rank
    for i in two:
        assert two[i][0] == one[i][0]
        assert float(two[i][2]) == pytest.approx(float(one[i][2]), rel=1e-5)
