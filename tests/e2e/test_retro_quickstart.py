"""End to end: the quickstart pipeline on a few stdlib files, then evaluate.py's JSON; and
pretrain_retro.py under torchrun with tensor + sequence parallelism on the work dir it built."""

import json
import math
import os
import subprocess
import sys

import pytest

from train_log import VALID_RE, iterations

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow
QUICKSTART_ARGS = ["--input", "stdlib", "--max-files", "12", "--vocab-size", "512", "--seq-length", "128", "--train-iters", "12",
                   "--eval-interval", "6", "--eval-iters", "2", "--global-batch-size", "4", "--micro-batch-size",
                   "2", "--num-layers", "3", "--hidden-size", "64", "--num-attention-heads", "4", "--workers", "1",
                   "--split", "75,25,0"]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    ws = tmp_path_factory.mktemp("quickstart") / "qs"
    cmd = [sys.executable, "examples/retro/quickstart.py", "--workspace", str(ws), *QUICKSTART_ARGS]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return ws, cmd, proc


def _pretrain_args(ws, *extra) -> list[str]:
    return ["pretrain_retro.py", "--retro-add-retriever", "--retro-work-dir", str(ws / "retro_workdir"),
            "--tokenizer-type", "HuggingFaceTokenizer", "--num-layers", "3", "--hidden-size", "64",
            "--num-attention-heads", "4", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--train-iters", "12", "--eval-interval", "6", "--eval-iters", "2", "--split", "75,25,0",
            "--seed", "1234", *extra]


def test_quickstart_on_a_stdlib_subset_writes_the_evaluation_json(tmp_path, quickstart):
    ws, cmd, proc = quickstart
    assert "RETRO, retrieval on" in proc.stdout
    assert "samples; 12 files of the Python" in proc.stdout  # the table names its corpus
    assert "3 validation documents, 9 training;" in proc.stdout  # tools/corpus_overlap.py, --split 75,25,0

    retro = json.loads((ws / "evals" / "retro" / "iter_0000012.json").read_text())
    assert retro["step"] == 12 and retro["model"] == "retro"
    assert (ws / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for mode in ("retrieval_on", "retrieval_off", "random_retrieval"):
        assert set(retro[mode]) == {"loss", "lm_loss", "ppl", "gate_mean"}
        assert all(math.isfinite(v) for v in retro[mode].values())
    for key in ("delta_lm_loss_off_minus_on", "delta_lm_loss_random_minus_on"):
        assert math.isfinite(retro[key])
    # Retrieval reaches the model: switching it off changes the loss.
    assert retro["retrieval_on"]["lm_loss"] != retro["retrieval_off"]["lm_loss"]
    gpt = json.loads((ws / "evals" / "gpt" / "iter_0000012.json").read_text())
    assert gpt["model"] == "gpt" and math.isfinite(gpt["retrieval_off"]["lm_loss"])

    # Running it again resumes: every step is found done.
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert again.stdout.count("[quickstart] skip") == 8


    # The work-dir check: another seq length or another tokenizer is refused, naming the field.
    base = [sys.executable, *_pretrain_args(ws)]
    wrong_seq = subprocess.run(base + ["--tokenizer-model", str(ws / "tokenizer"), "--seq-length", "64"],
                               cwd=REPO, capture_output=True, text=True, timeout=300)
    assert wrong_seq.returncode != 0 and "seq_length" in wrong_seq.stderr
    other_tok = tmp_path / "other_tokenizer"
    subprocess.run([sys.executable, "tools/train_tokenizer.py", "--input", str(ws / "corpus.jsonl"),
                    "--vocab-size", "300", "--output", str(other_tok)], cwd=REPO, check=True, timeout=300)
    wrong_tok = subprocess.run(base + ["--tokenizer-model", str(other_tok), "--seq-length", "128"],
                               cwd=REPO, capture_output=True, text=True, timeout=300)
    assert wrong_tok.returncode != 0 and "tokenizer_fingerprint" in wrong_tok.stderr


def _launch(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    proc = subprocess.run([sys.executable, *launcher, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_torchrun_tensor_and_sequence_parallel_retro_matches_one_process(quickstart):
    """tp2 + sp over 2 processes: vocabulary-parallel loss, CCA and encoder heads split; the same
    losses as one process (dropout off: the ranks' dropout masks are not the single process's)."""
    ws, _, _ = quickstart
    args = _pretrain_args(ws, "--tokenizer-model", str(ws / "tokenizer"), "--seq-length", "128",
                          "--exit-interval", "4", "--log-interval", "1",
                          "--hidden-dropout", "0", "--attention-dropout", "0", "--peak-tflops", "1")
    two = _launch([*args, "--tensor-model-parallel-size", "2", "--sequence-parallel"], nproc=2)
    one = _launch(args)
    got, want = iterations(two.stdout), iterations(one.stdout)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for i in want:
        assert float(got[i][2]) == pytest.approx(float(want[i][2]), rel=1e-5), i
    valid_two, valid_one = VALID_RE.findall(two.stdout), VALID_RE.findall(one.stdout)
    assert [i for i, _ in valid_two] == [i for i, _ in valid_one] == ["4"]
    assert float(valid_two[0][1]) == pytest.approx(float(valid_one[0][1]), rel=1e-5)


@pytest.mark.parametrize("layout", [["--pipeline-model-parallel-size", "2"],
                                    ["--tensor-model-parallel-size", "2", "--sequence-parallel"]],
                         ids=["pp2", "tp2_sp"])
def test_evaluate_under_torchrun_matches_one_process(quickstart, tmp_path, layout):
    """evaluate.py on 2 processes (pipelined: the forward-only schedule; or tensor parallel) loads
    the one-process checkpoint resharded and scores every mode as the one-process run did."""
    ws, _, _ = quickstart
    out = tmp_path / "eval.json"
    _launch(["tools/retro/evaluate.py", "--retro-work-dir", str(ws / "retro_workdir"), "--load",
             str(ws / "checkpoints" / "retro"), "--output", str(out), *layout], nproc=2)
    got, want = json.loads(out.read_text()), json.loads((ws / "evals" / "retro" / "iter_0000012.json").read_text())
    assert got["step"] == want["step"] and got["num_samples"] == want["num_samples"]
    for mode in ("retrieval_on", "retrieval_off", "random_retrieval"):
        for key in ("loss", "lm_loss", "gate_mean"):
            assert got[mode][key] == pytest.approx(want[mode][key], rel=1e-5), (mode, key)
