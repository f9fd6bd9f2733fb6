"""Suite-wide settings, and the real work dir (`workspace`) that the test files reading one share.

Tests use tiny models, for which one thread is as fast as two; and several test processes (the
multi-process tests, subprocesses of the e2e tests) share this 2-core machine, where
oversubscribed OpenMP threads slow small matmuls down by orders of magnitude.
"""

import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKSPACE_SEQ_LENGTH = 128

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the subprocesses tests start
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _single_thread():
    """Session-wide, so that module-scoped fixtures (reference runs, built corpora) run on one
    thread too, not only the tests."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """12 stdlib files -> tokenizer (vocab 512) -> indexed dataset -> work dir with a Flat index
    (~30 s; shared by the test files that read a real work dir, which must not change it)."""
    ws = tmp_path_factory.mktemp("gen")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    py = sys.executable
    corpus, tok, prefix, wd = ws / "corpus.jsonl", ws / "tokenizer", ws / "data" / "stdlib", ws / "wd"
    tok_args = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tok)]
    for cmd in (
        [py, "tools/corpus_from_files.py", "--output", str(corpus), "--max-files", "12"],
        [py, "tools/train_tokenizer.py", "--input", str(corpus), "--vocab-size", "512", "--output", str(tok)],
        [py, "tools/preprocess_data.py", "--input", str(corpus), "--output-prefix", str(prefix), "--json-keys",
         "text", *tok_args, "--append-eod", "--workers", "1"],
        [py, "tools/retro/preprocess_data.py", "--retro-tasks", "build", "--retro-work-dir", str(wd), "--data-path",
         f"{prefix}_text_document", *tok_args, "--seq-length", str(WORKSPACE_SEQ_LENGTH), "--train-iters", "4",
         "--global-batch-size", "2", "--eval-interval", "4", "--eval-iters", "1", "--split", "75,25,0",
         "--retro-gpt-chunk-length", "64", "--retro-index-str", "Flat", "--retro-query-num-neighbors-query", "8",
         "--retro-query-num-neighbors-save", "2"],
    ):
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return {"ws": ws, "tokenizer": tok, "work_dir": wd, "seq_length": WORKSPACE_SEQ_LENGTH}
