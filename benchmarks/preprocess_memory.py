"""Peak memory and wall time of tools/preprocess_data.py on one long document.

Run: python benchmarks/preprocess_memory.py [--sizes 1 50 200] [--max-whole-mb 50] [--out DIR]

For each size (MB of text: this Python's stdlib *.py sources, in path order, repeated and cut to
size), writes a one-document JSONL corpus and runs tools/preprocess_data.py on it in a subprocess
(--append-eod, one worker, a byte-level BPE tokenizer trained here on 100 stdlib files, vocab
8192), once encoding the document whole (--piece-chars 0; only up to --max-whole-mb, since it
needs ~150 bytes per character) and once in pieces (the default --piece-chars). Reports each run's
peak RSS (os.wait4's ru_maxrss of that subprocess) and wall time, and whether the two runs wrote
the same bytes. Not a test: numbers depend on the machine and on what else runs on it.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time

# tools/ is a directory of scripts, not an installed package: import it from the checkout.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from megatron.data.tokenizers import PIECE_CHARS
from tools.corpus_from_files import write_corpus
from tools.train_tokenizer import train_tokenizer

MB = 1 << 20


def stdlib_text(out: str, chars: int) -> str:
    """The first `chars` characters of the stdlib sources, repeated as often as needed."""
    corpus = os.path.join(out, "stdlib.jsonl")
    if not os.path.exists(corpus):
        write_corpus(sysconfig.get_paths()["stdlib"], "*.py", corpus)
    parts, total = [], 0
    while total < chars:
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                parts.append(json.loads(line)["text"])
                total += len(parts[-1])
                if total >= chars:
                    break
    return "".join(parts)[:chars]


def run_preprocess(corpus: str, prefix: str, tokenizer_dir: str, piece_chars: int) -> tuple[float, float, str]:
    """(peak RSS in MB, wall seconds, sha256 of .bin + .idx) of one preprocess_data.py run."""
    command = [sys.executable, os.path.join(REPO_ROOT, "tools", "preprocess_data.py"), "--input", corpus,
               "--output-prefix", prefix, "--json-keys", "text", "--tokenizer-type", "HuggingFaceTokenizer",
               "--tokenizer-model", tokenizer_dir, "--append-eod", "--piece-chars", str(piece_chars)]
    with tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        # wait4 gives this child's own peak, where getrusage(RUSAGE_CHILDREN) is the largest so far.
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped: Popen must not wait again
        if process.returncode != 0:
            stderr.seek(0)
            sys.exit(f"{' '.join(command)} failed:\n{stderr.read().decode()}")
    digest = hashlib.sha256()
    for suffix in (".bin", ".idx"):
        with open(f"{prefix}_text_document{suffix}", "rb") as f:
            digest.update(f.read())
    return usage.ru_maxrss / 1024, seconds, digest.hexdigest()  # ru_maxrss is in KiB on Linux


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 50, 200], help="document sizes, MB")
    parser.add_argument("--max-whole-mb", type=float, default=50,
                        help="largest document also encoded whole (~150 bytes of memory per character)")
    parser.add_argument("--piece-chars", type=int, default=PIECE_CHARS)
    parser.add_argument("--out", default=None, help="work directory (default: a temporary one, removed)")
    args = parser.parse_args()
    print("$ python benchmarks/preprocess_memory.py " + " ".join(sys.argv[1:]))

    with tempfile.TemporaryDirectory() as temp:
        out = args.out or temp
        os.makedirs(out, exist_ok=True)
        tokenizer_dir = os.path.join(out, "tok")
        write_corpus(sysconfig.get_paths()["stdlib"], "*.py", os.path.join(out, "train.jsonl"), max_files=100)
        train_tokenizer(os.path.join(out, "train.jsonl"), ["text"], 8192, tokenizer_dir)
        print(f"{os.cpu_count()} CPUs, tokenizer: byte-level BPE, vocab 8192, trained on 100 stdlib files")
        print(f"{'doc MB':>7} {'piece chars':>12} {'peak RSS MB':>12} {'wall s':>8}  same bytes as whole")
        for size in args.sizes:
            corpus = os.path.join(out, "doc.jsonl")
            with open(corpus, "w", encoding="utf-8") as f:
                f.write(json.dumps({"text": stdlib_text(out, int(size * MB))}) + "\n")
            digests = {}
            for piece_chars in ([0] if size <= args.max_whole_mb else []) + [args.piece_chars]:
                rss, seconds, digests[piece_chars] = run_preprocess(corpus, os.path.join(out, "doc"),
                                                                    tokenizer_dir, piece_chars)
                if piece_chars == 0:
                    same = "-"
                elif 0 in digests:
                    same = "yes" if digests[piece_chars] == digests[0] else "NO"
                else:
                    same = "(whole not run)"
                print(f"{size:>7g} {piece_chars or 'whole':>12} {rss:>12.0f} {seconds:>8.1f}  {same}", flush=True)


if __name__ == "__main__":
    main()
