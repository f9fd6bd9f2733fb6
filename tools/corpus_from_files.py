"""Turn a directory of text files into a JSONL corpus: one {"id", "text"} object per file.

    python tools/corpus_from_files.py --output corpus.jsonl            # this Python's stdlib *.py
    python tools/corpus_from_files.py --input src/ --glob '*.md' --max-files 100 --output docs.jsonl
    python tools/corpus_from_files.py --max-files 400 --shuffle-seed 1234 --output corpus.jsonl
    python tools/corpus_from_files.py --exclude-corpus corpus.jsonl --max-files 600 --shuffle-seed 1 --output db.jsonl
    python tools/corpus_from_files.py --input DIR --whole-directories --max-files 280 --shuffle-seed 1234 --output c.jsonl

The id is the file's path relative to --input, and files are written in id order, so the same
tree always gives the same corpus. With --shuffle-seed they are written in a seeded random order
instead (and --max-files keeps a random N): Megatron's --split cuts the document sequence into
contiguous train / valid / test ranges, so in id order the validation documents would be the
last packages of the alphabet (for the stdlib: the near-identical codec tables of encodings/),
not a sample of the corpus. With --whole-directories the draw takes the top-level directories
below --input whole, in the seed's order, as a code corpus holds whole repositories: a file's
siblings then sit in the corpus with it (the last directory drawn is cut at --max-files), and the
drawn files are written in the seed's random order, so the split still mixes directories.
Files that are not valid UTF-8 are skipped and counted.
--exclude-corpus leaves out the files (by id) of corpora already written, e.g. for a retrieval
datastore (tools/retro/preprocess_data.py --retro-db-data-path) that shares no document with the
training and validation text.
Installed third-party packages (site-packages) below --input are left out, so the default
corpus depends only on the Python version, not on what is installed.
"""

import argparse
import fnmatch
import json
import os
import random
import sys
import sysconfig
import uuid


def find_files(input_dir: str, pattern: str) -> list[tuple[str, str]]:
    """(id, path) of every file below input_dir whose name matches `pattern`, sorted by id."""
    root = os.path.realpath(input_dir)
    if not os.path.isdir(root):
        raise ValueError(f"{input_dir}: input directory not found")
    excluded = {os.path.realpath(sysconfig.get_paths()[name]) for name in ("purelib", "platlib")}
    found = []
    for directory, subdirectories, names in os.walk(root):
        # Prune rather than filter: site-packages can dwarf the stdlib.
        subdirectories[:] = [d for d in subdirectories
                             if os.path.realpath(os.path.join(directory, d)) not in excluded]
        for name in fnmatch.filter(names, pattern):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                found.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
    found.sort()
    return found


def corpus_ids(path: str) -> set[str]:
    """The "id" of every document of a JSONL corpus written by this tool."""
    ids = set()
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ids.add(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{line_number}: not a corpus line with an \"id\"") from None
    return ids


def draw_whole_directories(files: list[tuple[str, str]], max_files: int | None, seed: int) -> list[tuple[str, str]]:
    """The files of the top-level directories (a file directly below --input is its own group),
    taken whole in `seed`'s order up to `max_files`, then shuffled with the same seed."""
    groups = {}
    for doc_id, path in files:
        groups.setdefault(doc_id.split("/")[0], []).append((doc_id, path))
    order = sorted(groups)
    rng = random.Random(seed)
    rng.shuffle(order)
    drawn = [file for name in order for file in groups[name]][:max_files]
    rng.shuffle(drawn)
    return drawn


def write_corpus(input_dir: str, pattern: str, output: str, max_files: int | None = None,
                 shuffle_seed: int | None = None, exclude: tuple[str, ...] = (),
                 whole_directories: bool = False) -> tuple[int, int]:
    """Write the corpus to `output`, leaving out the documents of the corpora `exclude`; returns
    (documents written, files skipped as not UTF-8)."""
    files = find_files(input_dir, pattern)
    excluded = set().union(*(corpus_ids(path) for path in exclude))
    files = [(doc_id, path) for doc_id, path in files if doc_id not in excluded]
    if whole_directories:
        files = draw_whole_directories(files, max_files, shuffle_seed)
    else:
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(files)
        files = files[:max_files]
    if not files:
        raise ValueError(f"{input_dir}: no files match {pattern!r}")

    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    # A unique name rather than mkstemp, whose 0600 mode would stick to the renamed file.
    temp_path = f"{output}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    written = skipped = 0
    try:
        with open(temp_path, "x", encoding="utf-8") as out:
            for doc_id, path in files:
                try:
                    with open(path, "rb") as f:
                        text = f.read().decode("utf-8")
                except UnicodeDecodeError:
                    skipped += 1
                    continue
                out.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
                written += 1
        os.replace(temp_path, output)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise
    return written, skipped


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=sysconfig.get_paths()["stdlib"],
                        help="directory to read (default: this Python's stdlib)")
    parser.add_argument("--glob", default="*.py", help="file name pattern, matched at any depth below --input")
    parser.add_argument("--output", default="corpus.jsonl", help="JSONL file to write")
    parser.add_argument("--max-files", type=int, default=None,
                        help="keep only the first N files (by id, or of the shuffled order)")
    parser.add_argument("--shuffle-seed", type=int, default=None,
                        help="write the files in this seed's random order (default: id order)")
    parser.add_argument("--exclude-corpus", nargs="+", default=(), metavar="JSONL",
                        help="leave out the files whose id is in these corpora (a disjoint datastore)")
    parser.add_argument("--whole-directories", action="store_true",
                        help="draw the top-level directories below --input whole, in --shuffle-seed's order, "
                             "as a code corpus holds whole repositories")
    args = parser.parse_args(argv)
    if args.max_files is not None and args.max_files < 1:
        parser.error("--max-files must be at least 1")
    if args.whole_directories and args.shuffle_seed is None:
        parser.error("--whole-directories needs --shuffle-seed (the order the directories are drawn in)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        written, skipped = write_corpus(args.input, args.glob, args.output, args.max_files, args.shuffle_seed,
                                        tuple(args.exclude_corpus), args.whole_directories)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {written} documents to {args.output}; skipped {skipped} files that are not valid UTF-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
