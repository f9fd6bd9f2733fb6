"""How much of a corpus's validation text its training documents already hold, before any work dir.

    python tools/corpus_overlap.py --corpus WS/corpus.jsonl                  # the quickstart's --split 95,5,0
    python tools/corpus_overlap.py --corpus corpus.jsonl --split 90,10,0 --per-document

The documents are split as the dataset splits them (Megatron's --split over the documents in
corpus order), and each validation document's distinct word n-grams (runs of letters, digits and
underscores, or single punctuation marks) are looked up in the training documents. RETRO's
datastore is the training split, so this bounds what retrieval can give before the embedding step
is paid for. The quickstart's draws with `transformers` 5.25.0: 64.3% of the validation 13-grams
(280 files of whole model directories, the default), 37.0% (the same 280 files drawn one by one);
the stdlib's default draw: 0.8%.
"""

import argparse
import json
import re
import sys

from megatron.data.gpt_dataset import parse_split, split_document_ranges

WORD = re.compile(r"\w+|[^\w\s]")


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = WORD.findall(text)
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def read_corpus(path: str) -> list[tuple[str, str]]:
    """(id, text) of each document of a JSONL corpus, in order."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                docs.append((str(doc.get("id", line_number)), doc["text"]))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise ValueError(f"{path}:{line_number}: not a corpus line with a \"text\"") from None
    if not docs:
        raise ValueError(f"{path}: no documents")
    return docs


def validation_overlap(docs: list[tuple[str, str]], split: str, n: int) -> dict:
    """Per validation document and in all: distinct n-grams, and how many occur in a training document."""
    (train_start, train_end), (valid_start, valid_end), _ = split_document_ranges(parse_split(split), len(docs))
    if valid_start == valid_end:
        raise ValueError(f"--split {split}: no validation documents among {len(docs)}")
    train = set().union(*(word_ngrams(text, n) for _, text in docs[train_start:train_end]))
    per_document = []
    for doc_id, text in docs[valid_start:valid_end]:
        grams = word_ngrams(text, n)
        per_document.append({"id": doc_id, "ngrams": len(grams), "found": len(grams & train)})
    total = sum(d["ngrams"] for d in per_document)
    found = sum(d["found"] for d in per_document)
    return {"train_documents": train_end - train_start, "valid_documents": len(per_document), "ngram": n,
            "valid_ngrams": total, "found": found, "fraction": found / total if total else 0.0,
            "per_document": per_document}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="JSONL corpus (tools/corpus_from_files.py's output)")
    p.add_argument("--split", default="95,5,0", help="train,valid,test documents, as the training run's --split")
    p.add_argument("--ngram", type=int, default=13, help="n of the word n-grams (RETRO's overlap uses 13)")
    p.add_argument("--per-document", action="store_true", help="also print each validation document's share")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args(argv)
    if args.ngram < 1:
        p.error("--ngram must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = validation_overlap(read_corpus(args.corpus), args.split, args.ngram)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{args.corpus}: {report['valid_documents']} validation documents, {report['train_documents']} training; "
          f"{report['found']:,} of their {report['valid_ngrams']:,} distinct word {args.ngram}-grams "
          f"({100 * report['fraction']:.1f}%) occur in a training document")
    if args.per_document:
        for d in report["per_document"]:
            share = d["found"] / d["ngrams"] if d["ngrams"] else 0.0
            print(f"  {100 * share:5.1f}%  {d['ngrams']:>7,}  {d['id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
