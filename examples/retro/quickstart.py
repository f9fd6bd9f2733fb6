"""The whole RETRO pipeline on real source code, on one machine.

    python examples/retro/quickstart.py [--workspace runs/quickstart]    # transformers' model files
    python examples/retro/quickstart.py --preset long                      # 1,600 steps, 560 files one by one
    python examples/retro/quickstart.py --no-adaptive                      # no gate, no retrieval dropout
    python examples/retro/quickstart.py --input stdlib                     # the Python standard library
    python examples/retro/quickstart.py --input DIR --max-files 300 --db-max-files 600

The default corpus is the installed `transformers` package's models/ source: model files
generated from shared templates, so they repeat each other the way GitHub code does (RETRO's
largest gain in the paper), and the retriever finds those repeats. The stdlib repeats itself
little (its default draw's validation files share 0.8% of their word 13-grams with its training
files, against 64% for the default `transformers` draw of whole model directories;
tools/corpus_overlap.py), so there retrieval has little to give.

Steps (each a command a user could run by hand; each is skipped when its output exists, so an
interrupted quickstart resumes):
  1. tools/corpus_from_files.py          a seeded random sample of the *.py files (of transformers'
                                         model directories, taken whole) -> corpus.jsonl
     tools/corpus_overlap.py             how much of the validation text the training files hold
                                         (what retrieval can give; printed, never skipped)
  2. tools/train_tokenizer.py            byte-level BPE -> tokenizer/tokenizer.json
  3. tools/preprocess_data.py            -> data/corpus_text_document.bin/.idx
     (with --db-max-files, 1 and 3 again for a datastore of other files of --input)
  4. tools/retro/preprocess_data.py      work dir: chunk DB, embeddings, index, neighbours
  5. pretrain_retro.py --retro-add-retriever   a small RETRO, saved every --curve-interval steps
  6. tools/retro/evaluate.py --ckpt-step retrieval on / off / random at each saved step
  7. pretrain_retro.py, evaluate.py      the same-size GPT on the same samples
  8. tools/plot_runs.py                  the learning curves: a table, and curves.png
and prints the final evaluation table. Defaults are sized for a 2-core CPU (about 22 minutes;
--preset long 47 before the CPU speed-ups); --max-files 0 takes every file (the embedding step
then takes longer).
"""

import argparse
import json
import os
import subprocess
import sys
import time

from megatron.training.retro_step import MIN_RETRIEVAL_GAIN

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Flags a --preset changes; any of them given explicitly still wins.
# long: 560 files, so that 1,600 steps are about one pass and the GPT cannot close the gap by
# memorising the split (280 files: GPT - on fell to 0.0996 by step 1,600; docs/experiments.md),
# drawn one by one: the draw its README figures were measured on, before whole directories.
PRESETS = {"default": {}, "long": {"train_iters": 1600, "curve_interval": 400, "max_files": 560,
                                   "whole_directories": False}}
CORPUS_SEED = 1234  # the corpus's draw of files; the datastore of --db-max-files draws with another
# --adaptive: the Adaptive-RETRO card's gate, budget and retrieval dropout.
ADAPTIVE_FLAGS = ["--retro-attention-gate", "--retro-budget-loss-coeff", "0.001", "--retro-no-retrieval-prob", "0.1",
                  "--retro-random-retrieval-prob", "0.1"]


def corpus_dir(name: str) -> str | None:
    """--input's directory: `transformers` (its models/ source), `stdlib` (None: corpus_from_files's
    default, this Python's stdlib), or a path."""
    if name == "transformers":
        import transformers
        return os.path.join(os.path.dirname(transformers.__file__), "models")
    return None if name == "stdlib" else name


def corpus_description(args) -> str:
    """What the corpus was drawn from, with the version it depends on: another `transformers`
    release draws other files, and the README's figures move with it."""
    files = f"{args.max_files} files" if args.max_files else "every file"
    if args.input == "transformers":
        import transformers
        source = f"transformers {transformers.__version__} models/ source"
    elif args.input == "stdlib":
        source = f"the Python {sys.version.split()[0]} standard library"
    else:
        source = args.input
    unit = "whole directories" if args.whole_directories else "files"
    return f"{files} of {source}, {unit} drawn with seed {CORPUS_SEED}"


def run(cmd: list[str], done_marker: str | None = None, log: str | None = None):
    """Runs `cmd` unless `done_marker` exists; with `log`, its output also goes to that file
    (tools/plot_runs.py reads the training curves from it)."""
    if done_marker and os.path.exists(done_marker):
        print(f"[quickstart] skip (done: {done_marker}): {' '.join(cmd[1:3])}", flush=True)
        return
    print(f"[quickstart] $ {' '.join(cmd)}" + (f" > {log}" if log else ""), flush=True)
    start = time.time()
    if log is None:
        subprocess.run(cmd, check=True, cwd=REPO)
    else:
        os.makedirs(os.path.dirname(log), exist_ok=True)
        with open(log, "w") as f, subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                   text=True) as proc:
            for line in proc.stdout:
                f.write(line)
                sys.stdout.write(line)
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, cmd)
    print(f"[quickstart] ({time.time() - start:.0f} s)", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", default=os.path.join(REPO, "runs", "quickstart"))
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="long: 1,600 iterations on 560 files drawn one by one, evaluated every 400 (retrieval "
                        "pays 0.2 nats there; README)")
    p.add_argument("--input", default="transformers",
                   help="directory of *.py files, or 'transformers' (the installed package's models/ source) or "
                        "'stdlib' (this Python's standard library)")
    p.add_argument("--max-files", type=int, default=None,
                   help="0: every file (default: 280 of transformers, else 300; --preset long: 560 of any corpus)")
    p.add_argument("--whole-directories", action=argparse.BooleanOptionalAction, default=None,
                   help="draw the top-level directories of --input whole, as a code corpus holds whole "
                        "repositories (default: on for transformers, one directory per model; off otherwise: "
                        "the stdlib's would be its test suite)")
    p.add_argument("--db-max-files", type=int, default=0,
                   help="N > 0: the retrieval datastore is N other files of --input, sharing none with the "
                        "training and validation corpus (--retro-db-data-path); 0: the training split")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-length", type=int, default=256)
    # Steps of 4: at equal tokens, more and smaller steps train further (validation lm loss 2.21
    # against about 2.9 for 200 steps of 16 on the transformers corpus). 1,200 of them: retrieval
    # pays 0.14-0.16 nats there, 800 paid 0.08 (docs/experiments.md).
    p.add_argument("--train-iters", type=int, default=1200)
    p.add_argument("--global-batch-size", type=int, default=4)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-interval", type=int, default=400)
    p.add_argument("--eval-iters", type=int, default=40)
    p.add_argument("--curve-interval", type=int, default=200,
                   help="save and evaluate (on / off / random) every N iterations for the learning curves; "
                        "0: the last iteration only")
    p.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                   help="train RETRO with the per-chunk gate and the Adaptive-RETRO card's budget loss and "
                        "retrieval dropout (ADAPTIVE_FLAGS): it reads real neighbours into a lower loss and "
                        "shuts where they hold nothing (README, docs/experiments.md); --no-adaptive: neither")
    p.add_argument("--retrieval-warmup-iters", type=int, default=None,
                   help="RETRO trains its first N iterations with every neighbour masked "
                        "(--retro-retrieval-warmup-iters; default: 100, at most an eighth of the run): "
                        "neighbours read from step 0 slowed the decoder (docs/experiments.md)")
    p.add_argument("--split", default="95,5,0", help="train,valid,test documents (Megatron's --split)")
    p.add_argument("--workers", type=int, default=2)
    preset, _ = p.parse_known_args(argv)
    p.set_defaults(**PRESETS[preset.preset])
    args = p.parse_args(argv)
    if args.max_files is None:
        args.max_files = 280 if args.input == "transformers" else 300
    if args.whole_directories is None:
        args.whole_directories = args.input == "transformers"
    if args.retrieval_warmup_iters is None:
        args.retrieval_warmup_iters = min(100, args.train_iters // 8)
    return args


def main(argv=None):
    args = parse_args(argv)
    input_dir = corpus_dir(args.input)
    corpus_name = corpus_description(args)
    print(f"[quickstart] corpus: {corpus_name}", flush=True)

    ws = os.path.abspath(args.workspace)
    os.makedirs(ws, exist_ok=True)
    py = sys.executable
    corpus = os.path.join(ws, "corpus.jsonl")
    tokenizer_dir = os.path.join(ws, "tokenizer")
    prefix = os.path.join(ws, "data", "corpus")
    data_path = prefix + "_text_document"
    work_dir = os.path.join(ws, "retro_workdir")
    tok = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_dir]
    schedule = ["--seq-length", str(args.seq_length), "--train-iters", str(args.train_iters),
                "--global-batch-size", str(args.global_batch_size), "--eval-interval", str(args.eval_interval),
                "--eval-iters", str(args.eval_iters), "--split", args.split, "--seed", "1234"]

    # Shuffled: --split takes the last documents for validation, which in path order would be
    # one package's near-identical files.
    corpus_cmd = [py, "tools/corpus_from_files.py", "--output", corpus, "--shuffle-seed", str(CORPUS_SEED)]
    if input_dir:
        corpus_cmd += ["--input", input_dir]
    if args.max_files:
        corpus_cmd += ["--max-files", str(args.max_files)]
    if args.whole_directories:
        corpus_cmd.append("--whole-directories")
    run(corpus_cmd, corpus)
    run([py, "tools/corpus_overlap.py", "--corpus", corpus, "--split", args.split])
    run([py, "tools/train_tokenizer.py", "--input", corpus, "--vocab-size", str(args.vocab_size),
         "--output", tokenizer_dir], os.path.join(tokenizer_dir, "tokenizer.json"))
    run([py, "tools/preprocess_data.py", "--input", corpus, "--output-prefix", prefix, "--json-keys", "text",
         *tok, "--append-eod", "--workers", str(args.workers)], data_path + ".idx")
    datastore = []
    if args.db_max_files:
        db_corpus, db_prefix = os.path.join(ws, "db_corpus.jsonl"), os.path.join(ws, "data", "db")
        db_cmd = [py, "tools/corpus_from_files.py", "--output", db_corpus, "--shuffle-seed", "4321",
                  "--exclude-corpus", corpus, "--max-files", str(args.db_max_files)]
        run(db_cmd + (["--input", input_dir] if input_dir else []), db_corpus)
        run([py, "tools/preprocess_data.py", "--input", db_corpus, "--output-prefix", db_prefix, "--json-keys",
             "text", *tok, "--append-eod", "--workers", str(args.workers)], db_prefix + "_text_document.idx")
        datastore = ["--retro-db-data-path", db_prefix + "_text_document"]
    run([py, "tools/retro/preprocess_data.py", "--retro-tasks", "build", "--retro-work-dir", work_dir,
         "--data-path", data_path, *datastore, *tok, *schedule, "--retro-gpt-chunk-length", "64",
         "--retro-query-num-neighbors-query", "20", "--retro-query-num-neighbors-save", "2"],
        os.path.join(work_dir, "verify.json"))

    model = ["--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
             "--num-attention-heads", str(args.num_attention_heads), "--micro-batch-size",
             str(args.micro_batch_size), "--lr", str(args.lr), "--min-lr", str(args.lr / 10),
             "--lr-warmup-iters", str(max(1, args.train_iters // 20)), "--weight-decay", "0.01",
             "--clip-grad", "1.0", "--log-interval", "20", "--retro-num-neighbors", "2"]
    curve_interval = args.curve_interval or args.train_iters
    results, curves = {}, {}
    for name, extra in (("retro", retro_flags(args)), ("gpt", [])):
        ckpt = os.path.join(ws, "checkpoints", name)
        run([py, "pretrain_retro.py", "--retro-work-dir", work_dir, *tok, *schedule, *model, *extra,
             "--save", ckpt, "--save-interval", str(curve_interval)],
            os.path.join(ckpt, "latest_checkpointed_iteration.txt"), log=os.path.join(ws, "logs", f"{name}.log"))
        curves[name] = os.path.join(ws, "evals", name)
        steps = sorted({*range(curve_interval, args.train_iters + 1, curve_interval), args.train_iters})
        for step in steps:
            out = os.path.join(curves[name], f"iter_{step:07d}.json")
            run([py, "tools/retro/evaluate.py", "--retro-work-dir", work_dir, "--load", ckpt, "--ckpt-step",
                 str(step), "--output", out], out)
        with open(out) as f:
            results[name] = json.load(f)

    print_table(results, corpus_name)
    plot_curves(ws, curves)


def retro_flags(args) -> list[str]:
    """What the RETRO run adds to the GPT's flags: the retriever, an encoder half the decoder's
    width, the retrieval warm-up, and (--adaptive, the default) the card's gate, budget and retrieval
    dropout."""
    flags = ["--retro-add-retriever", "--retro-encoder-hidden-size", str(args.hidden_size // 2),
             "--retro-encoder-attention-heads", str(max(1, args.num_attention_heads // 2)),
             "--retro-retrieval-warmup-iters", str(args.retrieval_warmup_iters)]
    return flags + (ADAPTIVE_FLAGS if args.adaptive else [])


def plot_curves(ws: str, curves: dict):
    """Training and validation curves of both runs (tools/plot_runs.py) as a PNG and a table."""
    inputs = [f"{name}={path}" for name, path in curves.items()] + \
             [f"{name}={os.path.join(ws, 'logs', name + '.log')}" for name in curves]
    figure = os.path.join(ws, "curves.png")
    try:
        import matplotlib  # noqa: F401  (the optional 'plot' extra)
    except ImportError:
        figure = None
    cmd = [sys.executable, "tools/plot_runs.py", *inputs, "--table"] + (["--output", figure] if figure else [])
    print("\nvalidation lm loss at each saved iteration:", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    print(f"curves: {figure}" if figure else "curves: pip install -e .[plot] to draw them as a PNG")


def print_table(results: dict, corpus: str):
    retro, gpt = results["retro"], results["gpt"]
    rows = [("RETRO, retrieval on", retro["retrieval_on"]), ("RETRO, retrieval off", retro["retrieval_off"]),
            ("RETRO, random neighbours", retro["random_retrieval"]), ("GPT (same size, same samples)",
                                                                     gpt["retrieval_off"])]
    print(f"\nvalidation after {retro['step']} iterations ({retro['num_samples']} samples; {corpus}):")
    print(f"  {'model':<32} {'lm loss':>8} {'ppl':>9}")
    for name, r in rows:
        print(f"  {name:<32} {r['lm_loss']:>8.4f} {r['ppl']:>9.2f}")
    on = retro["retrieval_on"]["lm_loss"]
    off_gain, gpt_gain = retro["delta_lm_loss_off_minus_on"], gpt["retrieval_off"]["lm_loss"] - on
    print(f"  retrieval gain (positive: it helps): off - on {off_gain:.4f}, GPT - on {gpt_gain:.4f}")
    if min(off_gain, gpt_gain) < MIN_RETRIEVAL_GAIN:
        print("  retrieval did not help in this run: README 'What the quickstart run shows' says why;\n"
              "  tools/retro/evaluate.py --copy-probe tells whether a checkpoint copies at all")


if __name__ == "__main__":
    main()
