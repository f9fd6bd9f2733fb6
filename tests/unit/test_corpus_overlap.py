"""tools/corpus_overlap.py: the share of the validation documents' word n-grams found in training documents."""

import json
import random

from tools import corpus_overlap


def _words(rng: random.Random, count: int) -> str:
    return " ".join(f"w{rng.randrange(10**9)}" for _ in range(count))


def _write(path, texts):
    path.write_text("".join(json.dumps({"id": f"doc{i}.py", "text": t}) + "\n" for i, t in enumerate(texts)))


def test_a_validation_copy_of_a_training_document_is_found_and_novel_text_is_not(tmp_path, capsys):
    rng = random.Random(0)
    texts = [_words(rng, 40) for _ in range(18)]
    texts += [texts[3] + " .", _words(rng, 60)]  # --split 90,10,0: documents 18 and 19 are the validation
    _write(tmp_path / "c.jsonl", texts)

    report = corpus_overlap.validation_overlap(corpus_overlap.read_corpus(str(tmp_path / "c.jsonl")), "90,10,0", 13)
    copy, novel = report["per_document"]
    assert (report["train_documents"], copy["id"], novel["id"]) == (18, "doc18.py", "doc19.py")
    assert copy["found"] == 28 and copy["ngrams"] == 29  # 41 words: only the 13-gram ending in "." is new
    assert novel["found"] == 0 and novel["ngrams"] == 48
    assert abs(report["fraction"] - 28 / 77) < 1e-12

    assert corpus_overlap.main(["--corpus", str(tmp_path / "c.jsonl"), "--split", "90,10,0", "--per-document"]) == 0
    out = capsys.readouterr().out
    assert "28 of their 77 distinct word 13-grams (36.4%)" in out and "96.6%" in out and "doc19.py" in out


def test_repeats_among_validation_documents_do_not_count(tmp_path):
    rng = random.Random(1)
    shared = _words(rng, 30)
    texts = [_words(rng, 30) for _ in range(18)] + [shared, shared]
    _write(tmp_path / "c.jsonl", texts)
    report = corpus_overlap.validation_overlap(corpus_overlap.read_corpus(str(tmp_path / "c.jsonl")), "90,10,0", 13)
    assert report["found"] == 0 and report["valid_ngrams"] == 36


def test_bad_input_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "text": "x"}) + "\n{not json\n")
    assert corpus_overlap.main(["--corpus", str(bad)]) == 1
    assert f"{bad}:2: not a corpus line" in capsys.readouterr().err
    _write(tmp_path / "one.jsonl", ["only one document here"])
    assert corpus_overlap.main(["--corpus", str(tmp_path / "one.jsonl")]) == 1
    assert "no validation documents among 1" in capsys.readouterr().err
