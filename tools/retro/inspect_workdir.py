"""Inspect a retro work dir: what it holds, and what a sample's neighbours look like.

    python tools/retro/inspect_workdir.py --retro-work-dir wd [--json]
    python tools/retro/inspect_workdir.py --retro-work-dir wd --split valid --sample 3 --chunk 1 [--no-align]
    python tools/retro/inspect_workdir.py --retro-work-dir wd --db-chunk 1234
    python tools/retro/inspect_workdir.py --retro-work-dir wd --overlap-histogram --split valid \\
        --num-samples 200 --seed 1234

The tool to reach for when retrieval does not help (the successor of Megatron-LM's
tools/retro/cli). Without a mode flag it prints the work dir's sizes (config.json), its index,
the share of neighbour slots filled per split and the results of the last verify (verify.json).
--sample I --chunk J shows chunk J of sample I of --split and each saved neighbour of it as
training reads it (aligned to the chunk, as RetroConfig.align_neighbors defaults to; --no-align
reads from the DB chunk's boundary), with the 13-gram overlap of chunk J + 1, the chunk the
positions reading those neighbours predict, with each (the definition of evaluate.py
--overlap-buckets, megatron/retrieval/overlap.py). --db-chunk N shows a DB chunk, its document and
its continuation. --overlap-histogram counts the chunks of --num-samples random samples of
--split per overlap bucket. Texts are the work dir's tokens detokenized with its tokenizer, EOD
removed, as the retriever reads them. --json prints one JSON object instead of text.
"""

import argparse
import contextlib
import json
import os
import sys

import numpy as np

from megatron.retrieval.chunk_db import DATASET, DOCUMENT, LENGTH, OFFSET, ChunkDB
from megatron.retrieval.embedder import chunk_texts
from megatron.retrieval.neighbors import load_neighbors, workdir_dataset
from megatron.retrieval.overlap import OVERLAP_BUCKETS, OVERLAP_NGRAM, bucket_of, chunk_overlaps, neighbor_overlaps
from megatron.retrieval.workdir import WorkDir, build_workdir_tokenizer, check_dataset_fingerprints, load_workdir_config

SPLITS = ("train", "valid")  # the splits the query step saves neighbours for
# Neighbour ids counted per step of the fill rate: bounds memory whatever the file's size.
COUNT_STEP = 1 << 22


def work_dir_config(work_dir: str) -> dict:
    if not os.path.isdir(work_dir):
        raise ValueError(f"--retro-work-dir {work_dir}: no such directory")
    return load_workdir_config(work_dir)


def fill_rate(neighbors: np.ndarray) -> float:
    """Share of the neighbour slots that hold a chunk id (not -1)."""
    rows = max(1, COUNT_STEP // max(1, int(np.prod(neighbors.shape[1:]))))
    filled = sum(int(np.count_nonzero(np.asarray(neighbors[i:i + rows]) >= 0)) for i in range(0, len(neighbors), rows))
    return filled / neighbors.size if neighbors.size else 0.0


def summary(work_dir: str, cfg: dict) -> dict:
    wd = WorkDir(work_dir)
    neighbors = {}
    for split in SPLITS:
        if not os.path.isfile(wd.neighbors(split)):  # not queried yet, or a split without samples
            neighbors[split] = None
            continue
        ids = load_neighbors(work_dir, split)
        neighbors[split] = {"shape": list(ids.shape), "fill_rate": fill_rate(ids)}
    verified = None
    if os.path.isfile(wd.verify_report):
        try:
            with open(wd.verify_report, encoding="utf-8") as f:
                verified = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{wd.verify_report}: unreadable verify report: {e}") from None
    chunks_per_sample = -(-cfg["seq_length"] // cfg["chunk_length"])
    return {"work_dir": wd.root, "chunk_length": cfg["chunk_length"], "seq_length": cfg["seq_length"],
            "chunks_per_sample": chunks_per_sample,
            "db": {"chunks": cfg.get("num_chunks"), "valid_chunks": cfg.get("num_valid_chunks")},
            "index": {"index_str": cfg.get("chosen_index_str"), "chunks": cfg.get("index_ntotal"),
                      "nprobe": cfg["nprobe"], "ef_search": cfg["ef_search"]},
            "samples": {split: cfg[f"{split}_samples"] for split in SPLITS},
            "neighbors": neighbors, "verify": verified}


def format_summary(s: dict) -> str:
    db, index = s["db"], s["index"]
    built = f"{db['chunks']:,} chunks, {db['valid_chunks']:,} valid" if db["chunks"] is not None else "not built"
    if not index["index_str"]:
        trained = "not trained"
    else:
        added = f"holding {index['chunks']:,} chunks" if index["chunks"] is not None else "no chunks added yet"
        trained = f"{index['index_str']}, {added}"
    lines = [f"retro work dir {s['work_dir']}",
             f"  chunk DB:          {built}; chunk length {s['chunk_length']} tokens",
             f"  samples:           seq length {s['seq_length']}, {s['chunks_per_sample']} chunks per sample",
             f"  index:             {trained} (nprobe {index['nprobe']}, ef_search {index['ef_search']})"]
    for split, n in s["neighbors"].items():
        described = (f"[samples, chunks, k] = {n['shape']}, {n['fill_rate']:.1%} of the slots filled" if n
                     else f"none ({s['samples'][split]} samples in config.json)")
        lines.append(f"  {split + ' neighbours:':<18} {described}")
    lines.append("  verify:            " + format_verify(s["verify"]))
    return "\n".join(lines)


def format_verify(report: dict | None) -> str:
    if report is None:
        return "not verified (run tools/retro/preprocess_data.py --retro-tasks verify)"
    parts = []
    if "recall_at_k" in report:
        r = report["recall_at_k"]
        parts.append(f"recall@{r['k']} {r['recall']:.4f} on {r['queries']} queries")
    if "embeddings" in report:
        parts.append(f"embeddings min cosine {report['embeddings']['min_cosine']:.6f} "
                     f"({report['embeddings']['chunks']} chunks)")
    for split in SPLITS:
        if "neighbor_agreement" in report.get(split, {}):
            r = report[split]
            parts.append(f"{split} neighbours agree {r['neighbor_agreement']:.1%} ({r['samples_checked']} samples), "
                         f"{r['same_document_neighbors']} from the sample's own document")
    parts.append("failures: " + ("; ".join(report.get("failures", [])) or "none"))
    return "\n                     ".join(parts)


def retro_dataset(work_dir: str, cfg: dict, split: str, align: bool, data_cache_path: str | None):
    """The split's samples with all saved neighbours, as training reads them."""
    with contextlib.redirect_stdout(sys.stderr):  # its note on old work dirs would break --json
        check_dataset_fingerprints(cfg)
    return workdir_dataset(work_dir, cfg, split, align_neighbors=align, data_cache_path=data_cache_path)


def check_index(flag: str, value: int, size: int, what: str) -> None:
    if not 0 <= value < size:
        raise ValueError(f"{flag} {value}: out of range; {what} 0..{size - 1}")


def db_location(db: ChunkDB, cfg: dict, chunk_id: int) -> dict:
    row = np.asarray(db.chunks[chunk_id])
    return {"dataset": cfg["db_datasets"][int(row[DATASET])]["path"], "document": int(row[DOCUMENT]),
            "offset": int(row[OFFSET]), "length": int(row[LENGTH]), "valid": bool(db.valid[chunk_id])}


def sample_report(work_dir: str, cfg: dict, split: str, sample: int, chunk: int, align: bool,
                  data_cache_path: str | None) -> dict:
    tokenizer = build_workdir_tokenizer(work_dir, cfg)
    ds = retro_dataset(work_dir, cfg, split, align, data_cache_path)
    db = ds.chunk_db
    check_index("--sample", sample, len(ds), f"the {split} split has samples")
    check_index("--chunk", chunk, ds.neighbor_ids.shape[1], "a sample has chunks")
    item, m = ds[sample], db.chunk_length
    # Chunk J + 1 is scored where evaluate.py scores it: only when it is a whole chunk of the sample.
    scored = chunk + 1 < min(ds.neighbor_ids.shape[1], len(item["text"]) // m)
    next_chunk = item["text"][(chunk + 1) * m:(chunk + 2) * m] if scored else None
    neighbors = []
    for slot, (chunk_id, tokens, real) in enumerate(zip(ds.neighbor_ids[sample, chunk], item["neighbor_tokens"][chunk],
                                                       item["neighbor_mask"][chunk])):
        if not real:
            neighbors.append({"slot": slot, "id": -1})
            continue
        text, continuation = chunk_texts(tokens.reshape(2, m), db.eod, tokenizer)
        overlap = neighbor_overlaps(next_chunk, [tokens])[0] if scored else None
        neighbors.append({"slot": slot, "id": int(chunk_id), **db_location(db, cfg, int(chunk_id)), "text": text,
                          "continuation": continuation, "overlap": overlap})
    return {"split": split, "sample": sample, "chunk": chunk, "chunks_per_sample": ds.neighbor_ids.shape[1],
            "aligned": align, "ngram": OVERLAP_NGRAM,
            "text": chunk_texts(ds.sample_chunks(item["text"])[chunk:chunk + 1], db.eod, tokenizer)[0],
            "next_chunk_text": chunk_texts(next_chunk[None], db.eod, tokenizer)[0] if scored else None,
            "neighbors": neighbors}


def format_location(n: dict) -> str:
    return (f"document {n['document']} of {n['dataset']}, tokens {n['offset']}..{n['offset'] + n['length'] - 1}"
            f"{'' if n['valid'] else ', invalid'}")


def format_sample(r: dict) -> str:
    j = r["chunk"]
    read = "aligned to the chunk" if r["aligned"] else "from the DB chunk's boundary (--no-align)"
    lines = [f"{r['split']} sample {r['sample']}, chunk {j} (of {r['chunks_per_sample']}); neighbours read {read}",
             f"chunk {j}: {r['text']!r}"]
    if r["next_chunk_text"] is None:
        lines.append(f"chunk {j + 1} (predicted from these neighbours): not in the sample, so no overlap is scored")
    else:
        lines.append(f"chunk {j + 1} (predicted from these neighbours): {r['next_chunk_text']!r}")
    for n in r["neighbors"]:
        if n["id"] < 0:
            lines.append(f"neighbour {n['slot']}: none (-1)")
            continue
        overlap = "" if n["overlap"] is None else f", {r['ngram']}-gram overlap with chunk {j + 1}: {n['overlap']:.1%}"
        lines += [f"neighbour {n['slot']}: DB chunk {n['id']} ({format_location(n)}){overlap}",
                  f"  text:         {n['text']!r}", f"  continuation: {n['continuation']!r}"]
    return "\n".join(lines)


def db_chunk_report(work_dir: str, cfg: dict, chunk_id: int) -> dict:
    tokenizer = build_workdir_tokenizer(work_dir, cfg)
    db = ChunkDB(work_dir, cfg)
    check_index("--db-chunk", chunk_id, db.num_chunks, f"the chunk DB ({WorkDir(work_dir).chunks}) holds chunks")
    text, continuation = chunk_texts(db.get_tokens([chunk_id])[0].reshape(2, db.chunk_length), db.eod, tokenizer)
    return {"id": chunk_id, **db_location(db, cfg, chunk_id), "text": text, "continuation": continuation}


def format_db_chunk(r: dict) -> str:
    return "\n".join([f"DB chunk {r['id']}: {format_location(r)}, "
                      f"{'valid' if r['valid'] else 'no BERT text, so never retrieved'}",
                      f"  text:         {r['text']!r}", f"  continuation: {r['continuation']!r}"])


def histogram_report(work_dir: str, cfg: dict, split: str, num_samples: int, seed: int, align: bool,
                     data_cache_path: str | None) -> dict:
    """Chunks of randomly drawn samples per overlap bucket, scored as evaluate.py --overlap-buckets does."""
    ds = retro_dataset(work_dir, cfg, split, align, data_cache_path)
    db = ds.chunk_db
    samples = np.sort(np.random.default_rng(seed).choice(len(ds), size=min(num_samples, len(ds)), replace=False))
    counts = dict.fromkeys((name for name, _ in OVERLAP_BUCKETS), 0)
    for i in samples:
        item = ds[int(i)]
        for overlap in chunk_overlaps(item["text"], item["neighbor_tokens"], item["neighbor_mask"], db.chunk_length):
            counts[bucket_of(overlap)] += 1
    total = sum(counts.values())
    return {"split": split, "seed": seed, "aligned": align, "ngram": OVERLAP_NGRAM, "samples": samples.tolist(),
            "chunks": total,
            "buckets": {name: {"chunks": c, "share": c / total if total else None} for name, c in counts.items()}}


def format_histogram(r: dict) -> str:
    read = "aligned" if r["aligned"] else "unaligned"
    lines = [f"{r['ngram']}-gram overlap of each chunk with the {read} neighbours it is predicted from (chunk 0 "
             f"reads none): {r['chunks']} chunks of {len(r['samples'])} {r['split']} samples drawn with seed {r['seed']}"]
    for name, b in r["buckets"].items():
        share = "" if b["share"] is None else f"{b['share']:7.1%}"
        lines.append(f"  {name:>6} {b['chunks']:8d} {share}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--retro-work-dir", required=True, help="work dir built by tools/retro/preprocess_data.py")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--sample", type=int, default=None, help="show this sample of --split (needs --chunk)")
    mode.add_argument("--db-chunk", type=int, default=None, help="show this chunk of the chunk DB")
    mode.add_argument("--overlap-histogram", action="store_true",
                      help="per-chunk overlap buckets over --num-samples random samples of --split")
    p.add_argument("--chunk", type=int, default=None, help="the chunk of --sample to show")
    p.add_argument("--split", choices=SPLITS, default="valid", help="the split of --sample and --overlap-histogram")
    p.add_argument("--no-align", action="store_true",
                   help="read neighbours from the DB chunk's boundary, as a --no-retro-align-neighbors run does")
    p.add_argument("--num-samples", type=int, default=100, help="samples drawn for --overlap-histogram")
    p.add_argument("--seed", type=int, default=1234, help="seed of the --overlap-histogram draw")
    p.add_argument("--data-cache-path", default=None,
                   help="where the GPT dataset's index caches are (the --data-cache-path the work dir was built with)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args(argv)
    if (args.sample is None) != (args.chunk is None):
        p.error("--sample and --chunk go together")
    if args.num_samples < 1:
        p.error("--num-samples must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    align = not args.no_align
    try:
        cfg = work_dir_config(args.retro_work_dir)
        if args.sample is not None:
            report = sample_report(args.retro_work_dir, cfg, args.split, args.sample, args.chunk, align,
                                   args.data_cache_path)
            render = format_sample
        elif args.db_chunk is not None:
            report, render = db_chunk_report(args.retro_work_dir, cfg, args.db_chunk), format_db_chunk
        elif args.overlap_histogram:
            report = histogram_report(args.retro_work_dir, cfg, args.split, args.num_samples, args.seed, align,
                                      args.data_cache_path)
            render = format_histogram
        else:
            report, render = summary(args.retro_work_dir, cfg), format_summary
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
