"""End to end: examples/retro/adaptive_retro_1b.sh itself, at toy scale on the CPU. Parquet shards
written here stand in for FineWeb-Edu and Wikipedia; the environment shrinks the model, the
schedule and the index (Flat), and runs every command in one process. The card's retrieval flags
are unchanged: the gate, its budget loss, no- and random-retrieval."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tools.train_tokenizer import train_tokenizer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "retro" / "adaptive_retro_1b.sh"
TRAIN_ITERS = 4
TOY = {"NUM_LAYERS": "2", "HIDDEN_SIZE": "64", "NUM_HEADS": "4", "ENCODER_HIDDEN_SIZE": "32",
       "ENCODER_HEADS": "2", "RETRO_LAYERS": "2", "SEQ_LENGTH": "128", "TRAIN_ITERS": str(TRAIN_ITERS),
       "GLOBAL_BATCH_SIZE": "4", "MICRO_BATCH_SIZE": "2", "LR_WARMUP_ITERS": "1", "EVAL_INTERVAL": "2",
       "EVAL_ITERS": "1", "SAVE_INTERVAL": "2", "INDEX_STR": "Flat", "NPROBE": "1", "EF_SEARCH": "16",
       "BF16": "0", "WORKERS": "1"}


def documents(rng: random.Random, count: int, words: list[str]) -> list[str]:
    return [" ".join(rng.choice(words) for _ in range(rng.randint(30, 120))) + "." for _ in range(count)]


def write_shards(directory: Path, columns: dict[str, list[str]], shards: int):
    """The columns split into `shards` parquet files named as the datasets' are, in order."""
    directory.mkdir(parents=True)
    rows = len(next(iter(columns.values())))
    for s in range(shards):
        part = {name: values[s * rows // shards:(s + 1) * rows // shards] for name, values in columns.items()}
        pq.write_table(pa.table(part), directory / f"train-{s:05d}-of-{shards:05d}.parquet")


def test_the_recipe_runs_from_parquet_to_the_evaluation_json(tmp_path):
    rng = random.Random(1234)
    words = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "su", "ta", "vi", "ro") for b in ("n", "m", "s", "l", "")]
    web = documents(rng, 300, words)
    wiki = documents(rng, 40, words)
    # FineWeb-Edu's and Wikipedia's own column layouts; the recipe reads only "text".
    write_shards(tmp_path / "fineweb", {"text": web, "id": [f"web-{i}" for i in range(len(web))]}, shards=2)
    write_shards(tmp_path / "wikipedia", {"id": [str(i) for i in range(len(wiki))],
                                          "title": [f"Article {i}" for i in range(len(wiki))], "text": wiki},
                 shards=2)
    corpus = tmp_path / "tokenizer_corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in web + wiki))
    train_tokenizer(str(corpus), ["text"], 512, str(tmp_path / "tok"))

    run_dir = tmp_path / "run"
    env = dict(os.environ, **TOY, FINEWEB_EDU=str(tmp_path / "fineweb"), WIKIPEDIA=str(tmp_path / "wikipedia"),
               TOKENIZER_MODEL=str(tmp_path / "tok"), RUN=str(run_dir), PYTHON=sys.executable,
               LAUNCH=sys.executable, OMP_NUM_THREADS="1")
    env.pop("DRY_RUN", None)
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # Both corpora came from every parquet shard, and Wikipedia is the work dir's datastore.
    assert "data/fineweb_edu_text_document.bin/.idx: 300 documents" in proc.stdout
    assert "data/wikipedia_text_document.bin/.idx: 40 documents" in proc.stdout
    wd_cfg = json.loads((run_dir / "retro_workdir" / "config.json").read_text())
    assert [entry["path"] for entry in wd_cfg["db_datasets"]] == [str(run_dir / "data" / "wikipedia_text_document")]
    # The card's adaptive-retrieval terms are trained.
    assert "budget loss" in proc.stdout and "gate mean" in proc.stdout

    result = json.loads((run_dir / "evals" / f"iter_{TRAIN_ITERS:07d}.json").read_text())
    assert result["step"] == TRAIN_ITERS and result["model"] == "retro"
    for mode in ("retrieval_on", "retrieval_off", "random_retrieval"):
        assert all(math.isfinite(v) for v in result[mode].values()), mode
    assert result["retrieval_off"]["gate_mean"] == 0.0 < result["retrieval_on"]["gate_mean"]

    # Run again: the finished steps are skipped, and training resumes at its last iteration.
    again = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stderr.count("[adaptive_retro_1b] skip (done:") == 4
    assert f"at iteration {TRAIN_ITERS} (consumed samples" in again.stdout
