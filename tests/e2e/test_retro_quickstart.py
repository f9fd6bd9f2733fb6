"""End to end: the quickstart pipeline on a few stdlib files, then evaluate.py's JSON."""

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_quickstart_on_a_stdlib_subset_writes_the_evaluation_json(tmp_path):
    ws = tmp_path / "qs"
    cmd = [sys.executable, "examples/retro/quickstart.py", "--workspace", str(ws), "--max-files", "12",
           "--vocab-size", "512", "--seq-length", "128", "--train-iters", "12", "--eval-interval", "6",
           "--eval-iters", "2", "--global-batch-size", "4", "--micro-batch-size", "2", "--num-layers", "3",
           "--hidden-size", "64", "--num-attention-heads", "4", "--workers", "1", "--split", "75,25,0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RETRO, retrieval on" in proc.stdout

    retro = json.loads((ws / "eval_retro.json").read_text())
    assert retro["step"] == 12 and retro["model"] == "retro"
    for mode in ("retrieval_on", "retrieval_off", "random_retrieval"):
        assert set(retro[mode]) == {"loss", "lm_loss", "ppl", "gate_mean"}
        assert all(math.isfinite(v) for v in retro[mode].values())
    for key in ("delta_lm_loss_off_minus_on", "delta_lm_loss_random_minus_on"):
        assert math.isfinite(retro[key])
    # Retrieval reaches the model: switching it off changes the loss.
    assert retro["retrieval_on"]["lm_loss"] != retro["retrieval_off"]["lm_loss"]
    gpt = json.loads((ws / "eval_gpt.json").read_text())
    assert gpt["model"] == "gpt" and math.isfinite(gpt["retrieval_off"]["lm_loss"])

    # Running it again resumes: every step is found done.
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert again.stdout.count("[quickstart] skip") == 8


    # The work-dir check: another seq length or another tokenizer is refused, naming the field.
    base = [sys.executable, "pretrain_retro.py", "--retro-add-retriever", "--retro-work-dir",
            str(ws / "retro_workdir"), "--tokenizer-type", "HuggingFaceTokenizer", "--num-layers", "3",
            "--hidden-size", "64", "--num-attention-heads", "4", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", "12", "--eval-interval", "6", "--eval-iters", "2",
            "--split", "75,25,0", "--seed", "1234"]
    wrong_seq = subprocess.run(base + ["--tokenizer-model", str(ws / "tokenizer"), "--seq-length", "64"],
                               cwd=REPO, capture_output=True, text=True, timeout=300)
    assert wrong_seq.returncode != 0 and "seq_length" in wrong_seq.stderr
    other_tok = tmp_path / "other_tokenizer"
    subprocess.run([sys.executable, "tools/train_tokenizer.py", "--input", str(ws / "corpus.jsonl"),
                    "--vocab-size", "300", "--output", str(other_tok)], cwd=REPO, check=True, timeout=300)
    wrong_tok = subprocess.run(base + ["--tokenizer-model", str(other_tok), "--seq-length", "128"],
                               cwd=REPO, capture_output=True, text=True, timeout=300)
    assert wrong_tok.returncode != 0 and "tokenizer_fingerprint" in wrong_tok.stderr
