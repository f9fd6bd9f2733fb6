"""tools/retro/inspect_workdir.py on the `workspace` fixture's real work dir (tests/conftest.py):
its numbers against the work dir's files, its texts against what training reads, its overlaps
against evaluate.py's, and its errors. Work dirs the tests change are copies."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from megatron.data.tokenizers import build_tokenizer
from megatron.retrieval.chunk_db import ChunkDB
from megatron.retrieval.neighbors import load_neighbors
from megatron.retrieval.overlap import neighbor_overlaps
from megatron.retrieval.workdir import WorkDir, load_workdir_config, write_json
from tools.retro.evaluate import OVERLAP_BUCKETS, bucket_of, chunk_overlaps
from tools.retro.inspect_workdir import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
M = 64  # the fixture's --retro-gpt-chunk-length


def run_tool(capsys, work_dir, *args) -> tuple[int, str, str]:
    rc = main(["--retro-work-dir", str(work_dir), *args])
    out, err = capsys.readouterr()
    return rc, out, err


def training_dataset(workspace, work_dir, split: str, align: bool = True, warmup_iters: int = 0):
    """The split's RetroDataset as pretrain_retro.py builds it for the fixture's work dir."""
    from megatron.data.config import DataConfig
    from megatron.models.retro.config import RetroConfig
    from megatron.training import retro_config, retro_data
    from megatron.training.config import Config, TrainingConfig
    from megatron.training.trainer import sample_counts
    from megatron.transformer.config import ModelConfig

    cfg = Config(model=ModelConfig(seq_length=workspace["seq_length"]),
                 data=DataConfig(split="75,25,0", tokenizer_type="HuggingFaceTokenizer",
                                 tokenizer_model=str(workspace["tokenizer"])),
                 training=TrainingConfig(global_batch_size=2, train_iters=4, eval_interval=4, eval_iters=1))
    cfg.retro = retro_config.RetroTrainingConfig(add_retriever=True, work_dir=str(work_dir),
                                                   model=RetroConfig(chunk_length=M, num_neighbors=2,
                                                                     align_neighbors=align),
                                                   retrieval_warmup_iters=warmup_iters)
    retro_data.prepare(cfg)
    train, valid = retro_data.datasets(cfg, sample_counts(cfg))[:2]
    return {"train": train, "valid": valid}[split]


def test_the_retrieval_warmup_masks_the_first_iterations_global_batches(workspace):
    """--retro-retrieval-warmup-iters counts iterations: the fixture's global batch is 2 samples."""
    plain = training_dataset(workspace, workspace["work_dir"], "train")
    warm = training_dataset(workspace, workspace["work_dir"], "train", warmup_iters=1)
    assert plain[0]["neighbor_mask"].any() and plain[1]["neighbor_mask"].any()
    assert not warm[0]["neighbor_mask"].any() and not warm[1]["neighbor_mask"].any()
    assert np.array_equal(warm[2]["neighbor_mask"], plain[2]["neighbor_mask"])


def text_of(tokenizer, tokens, eod) -> str:
    tokens = np.asarray(tokens)
    return tokenizer.detokenize(tokens[tokens != eod])


@pytest.fixture
def work_dir_copy(workspace, tmp_path):
    """A copy of the fixture's work dir to change (its config names the same data and tokenizer)."""
    copy = tmp_path / "wd"
    shutil.copytree(workspace["work_dir"], copy)
    return copy


def test_summary_numbers_are_those_of_the_work_dir_files(workspace, work_dir_copy, capsys):
    wd = WorkDir(str(work_dir_copy))
    valid = np.load(wd.neighbors("valid"))
    valid[1, :, 1] = -1  # slots a query left empty
    valid[3, 0, 0] = -1
    np.save(wd.neighbors("valid"), valid)
    with open(wd.verify_report) as f:
        report = json.load(f)
    # Run as a user does: a subprocess from the repository root.
    proc = subprocess.run([sys.executable, "tools/retro/inspect_workdir.py", "--retro-work-dir", wd.root, "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["db"] == {"chunks": len(np.load(wd.chunks)), "valid_chunks": int(np.load(wd.valid).sum())}
    assert summary["chunk_length"] == M and summary["chunks_per_sample"] == workspace["seq_length"] // M
    with open(wd.config) as f:
        cfg = json.load(f)
    assert summary["index"] == {"index_str": "Flat", "chunks": summary["db"]["chunks"], "nprobe": cfg["nprobe"],
                                "ef_search": cfg["ef_search"]}
    for split in ("train", "valid"):
        ids = np.load(wd.neighbors(split))
        assert summary["neighbors"][split] == {"shape": list(ids.shape), "fill_rate": float((ids != -1).mean())}
    assert summary["neighbors"]["valid"]["fill_rate"] == 1 - 3 / 16
    assert summary["verify"]["recall_at_k"] == report["recall_at_k"]

    rc, out, _ = run_tool(capsys, wd.root)
    assert rc == 0
    assert f"{summary['db']['chunks']:,} chunks" in out and f"[4, 2, 2], {1 - 3 / 16:.1%} of the slots filled" in out
    assert f"recall@2 {report['recall_at_k']['recall']:.4f}" in out and "failures: none" in out
    os.remove(wd.verify_report)
    rc, out, _ = run_tool(capsys, wd.root)
    assert rc == 0 and "verify:            not verified" in out


@pytest.mark.parametrize("align", [True, False])
def test_sample_chunk_shows_the_chunk_and_each_neighbour_as_training_reads_it(workspace, capsys, align):
    work_dir = workspace["work_dir"]
    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(workspace["tokenizer"]))
    db = ChunkDB(str(work_dir))
    sample, chunk = 0, 0
    item = training_dataset(workspace, work_dir, "train", align)[sample]
    sample_chunk = item["text"][chunk * M:(chunk + 1) * M]
    ids = load_neighbors(str(work_dir), "train")[sample, chunk]
    tokens = db.get_tokens(ids, align_to=sample_chunk if align else None)
    assert np.array_equal(tokens, item["neighbor_tokens"][chunk])
    assert not np.array_equal(db.get_tokens(ids, align_to=sample_chunk), db.get_tokens(ids))  # a neighbour moves

    flags = ["--split", "train", "--sample", str(sample), "--chunk", str(chunk)] + ([] if align else ["--no-align"])
    rc, out, _ = run_tool(capsys, work_dir, *flags)
    assert rc == 0
    lines = out.splitlines()
    assert f"chunk {chunk}: {text_of(tokenizer, sample_chunk, db.eod)!r}" in lines
    next_chunk = item["text"][(chunk + 1) * M:(chunk + 2) * M]
    assert f"chunk {chunk + 1} (predicted from these neighbours): {text_of(tokenizer, next_chunk, db.eod)!r}" in lines
    for slot, (chunk_id, window) in enumerate(zip(ids, tokens)):
        header = [i for i, line in enumerate(lines) if line.startswith(f"neighbour {slot}: DB chunk {chunk_id} (")][0]
        overlap = neighbor_overlaps(next_chunk, [window])[0]
        assert lines[header].endswith(f"13-gram overlap with chunk {chunk + 1}: {overlap:.1%}")
        assert lines[header + 1] == f"  text:         {text_of(tokenizer, window[:M], db.eod)!r}"
        assert lines[header + 2] == f"  continuation: {text_of(tokenizer, window[M:], db.eod)!r}"

    # The last chunk predicts nothing inside the sample: no overlap is scored.
    rc, out, _ = run_tool(capsys, work_dir, "--split", "train", "--sample", str(sample), "--chunk", "1", "--json")
    report = json.loads(out)
    assert rc == 0 and report["next_chunk_text"] is None
    assert all(n["overlap"] is None for n in report["neighbors"])


def plant_copies(workspace, work_dir, samples) -> None:
    """Give chunk 0 of each of these train samples, in neighbour slot 0, the DB chunk whose aligned
    read holds the most of the sample's chunk 1: the neighbour that training could copy from."""
    db = ChunkDB(str(work_dir))
    dataset = training_dataset(workspace, work_dir, "train")
    path = WorkDir(str(work_dir)).neighbors("train")
    ids = np.load(path)
    every_chunk = np.arange(db.num_chunks)[None]
    for sample in samples:
        text = dataset[sample]["text"]
        windows = db.get_tokens(every_chunk, align_to=text[None, :M])[0]
        ids[sample, 0, 0] = int(np.argmax(neighbor_overlaps(text[M:2 * M], windows)))
    np.save(path, ids)


def test_overlap_histogram_counts_the_chunks_as_evaluate_scores_them(workspace, work_dir_copy, capsys):
    plant_copies(workspace, work_dir_copy, [0, 2, 4, 6])  # 6 samples of 8 drawn: 2 of these at least
    args = ["--overlap-histogram", "--split", "train", "--num-samples", "6", "--seed", "3"]
    for align in (True, False):
        flags = args + ([] if align else ["--no-align"])
        rc, out, _ = run_tool(capsys, work_dir_copy, *flags, "--json")
        assert rc == 0
        report = json.loads(out)
        samples = report["samples"]
        assert len(set(samples)) == 6 and samples == sorted(samples) and max(samples) < 8
        dataset = training_dataset(workspace, work_dir_copy, "train", align)
        expected = dict.fromkeys((name for name, _ in OVERLAP_BUCKETS), 0)
        for sample in samples:
            item = dataset[sample]
            for overlap in chunk_overlaps(item["text"], item["neighbor_tokens"], item["neighbor_mask"], M):
                expected[bucket_of(overlap)] += 1
        assert {name: b["chunks"] for name, b in report["buckets"].items()} == expected
        assert report["chunks"] == sum(expected.values()) == len(samples) * (workspace["seq_length"] // M - 1)
        assert sum(b["share"] for b in report["buckets"].values()) == pytest.approx(1.0)
        # The planted copies hold chunk 1 where it sits aligned, not at the DB chunk's boundary.
        assert (expected[">80%"] >= 2) == align
        rc, out, _ = run_tool(capsys, work_dir_copy, *flags)
        assert rc == 0 and f"{report['chunks']} chunks of 6 train samples drawn with seed 3" in out
        assert f"   >80% {expected['>80%']:8d}" in out


def test_db_chunk_shows_its_document_text_and_continuation(workspace, capsys):
    work_dir = workspace["work_dir"]
    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(workspace["tokenizer"]))
    db = ChunkDB(str(work_dir))
    chunk_id = 17
    rc, out, _ = run_tool(capsys, work_dir, "--db-chunk", str(chunk_id), "--json")
    assert rc == 0
    report = json.loads(out)
    dataset, document, offset, length = np.load(WorkDir(str(work_dir)).chunks)[chunk_id]
    tokens = db.get_tokens([chunk_id])[0]
    db_datasets = load_workdir_config(str(work_dir))["db_datasets"]
    assert report == {"id": chunk_id, "dataset": db_datasets[dataset]["path"], "document": int(document),
                      "offset": int(offset), "length": int(length), "valid": bool(db.valid[chunk_id]),
                      "text": text_of(tokenizer, tokens[:M], db.eod),
                      "continuation": text_of(tokenizer, tokens[M:], db.eod)}


def test_bad_input_is_refused_naming_the_flag_or_file(workspace, work_dir_copy, tmp_path, capsys):
    work_dir = workspace["work_dir"]
    num_chunks = len(np.load(WorkDir(str(work_dir)).chunks))
    proc = subprocess.run([sys.executable, "tools/retro/inspect_workdir.py", "--retro-work-dir", str(work_dir),
                           "--db-chunk", str(num_chunks)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"error: --db-chunk {num_chunks}: out of range; the chunk DB "
                                   f"({WorkDir(str(work_dir)).chunks}) holds chunks 0..{num_chunks - 1}")
    for args, message in ((["--split", "valid", "--sample", "4", "--chunk", "0"], "--sample 4: out of range; "
                           "the valid split has samples 0..3"),
                          (["--sample", "0", "--chunk", "2"], "--chunk 2: out of range; a sample has chunks 0..1")):
        rc, _, err = run_tool(capsys, work_dir, *args)
        assert rc == 1 and err == f"error: {message}\n"
    rc, _, err = run_tool(capsys, tmp_path / "missing")
    assert rc == 1 and "missing: no such directory" in err
    rc, _, err = run_tool(capsys, tmp_path)
    assert rc == 1 and f"{tmp_path / 'config.json'}: not found" in err
    copy = WorkDir(str(work_dir_copy))
    os.remove(copy.neighbors("valid"))
    rc, _, err = run_tool(capsys, copy.root, "--sample", "0", "--chunk", "0")
    assert rc == 1 and f"{copy.neighbors('valid')}: not found" in err
    write_json(copy.config, dict(load_workdir_config(copy.root), valid_samples=0))  # as with --eval-iters 0
    rc, _, err = run_tool(capsys, copy.root, "--overlap-histogram")
    assert rc == 1 and "--split valid: the work dir has no valid samples" in err
