"""Plot the lm loss of training runs and of checkpoint evaluations into one figure.

    python tools/plot_runs.py retro=runs/retro.log gpt=runs/gpt.log --output loss.png
    python tools/plot_runs.py retro=runs/retro.log retro=evals/retro/ gpt=evals/gpt/ \\
        --output loss.png --title "RETRO vs GPT" --table

Each input is PATH or LABEL=PATH, in any mix of:

  * a log (stdout) of pretrain_retro.py / pretrain_gpt.py: the train lm loss of every logged
    iteration and the validation lm loss of every evaluation (megatron/training/logging.py);
  * a JSON written by tools/retro/evaluate.py --output, or a directory of them (every *.json):
    the points of one label are sorted by "step" into a curve per mode, retrieval on / off /
    random for a RETRO checkpoint and one for a GPT.

Without a label, a log is named by its file name less the extension, a directory by its name
and a loose JSON by its "model" ("retro" / "gpt"), so `evals/*.json` of one run is one set of
curves; give LABEL= to keep several runs apart.

The figure has two panels: training lm loss vs iteration (a line per log) and validation lm
loss vs iteration (the logs' validation points and the evaluations' curves; a label keeps its
colour in both). --table prints the validation points as a markdown table, a row per iteration
and a column per series, so a document can quote the numbers behind the figure.
"""

import argparse
import glob
import json
import os
import re
import sys

# The line formats of megatron/training/logging.py. Not anchored at the line start: a launcher
# may prefix each line (torchrun --tee, e.g. "[default0]:").
TRAIN_RE = re.compile(r"\biteration\s+(\d+)/\s*\d+ \|(.*)")
# "validation loss at iteration 400 | ..." or, at the end of training, "... 400 on validation set | ...".
VALID_RE = re.compile(r"\bvalidation loss at iteration (\d+)[^|]*\|(.*)")
# Lines every run of the trainer prints before its first iteration: a log that has them but no
# loss line is a run's log that logged nothing, not some other file.
LOG_MARKERS = (" arguments ----", " > training ...")
LM_LOSS = "lm loss"

# evaluate.py's keys, as series names; a GPT checkpoint has only "retrieval_off".
MODES = {"retrieval_on": "retrieval on", "retrieval_off": "retrieval off", "random_retrieval": "random retrieval"}
GPT = "GPT"
LOG = "log"
# (linestyle, marker) by kind; a label has one colour, so its log and "retrieval on" curves need
# different markers to be told apart where they coincide.
STYLES = {LOG: ("-", "o"), "retrieval on": ("-", "s"), "retrieval off": ("--", "^"),
          "random retrieval": (":", "v"), GPT: ("-.", "D")}


class InputError(Exception):
    """A problem with an input or the environment: printed as 'error: ...', without a traceback."""


def split_label(arg: str) -> tuple[str | None, str]:
    """LABEL=PATH -> (LABEL, PATH); an existing path that contains '=' stays a plain path."""
    if "=" in arg and not os.path.exists(arg):
        label, path = arg.split("=", 1)
        if not label:
            raise InputError(f"{arg}: empty label before '='")
        return label, path
    return None, arg


def _fields(rest: str) -> dict[str, str]:
    """'name: value' of each '|'-separated field."""
    return {k.strip(): v.strip() for k, _, v in (f.partition(": ") for f in rest.split("|")) if v}


def _loss(path: str, lineno: int, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InputError(f"{path}:{lineno}: lm loss {text!r} is not a number") from None


def parse_log(path: str, text: str) -> tuple[dict[int, float], dict[int, float]] | None:
    """({iteration: train lm loss}, {iteration: validation lm loss}) of a training log; None if
    `text` is not one. A resumed run appending to its log repeats iterations after its
    checkpoint: the later line wins, as the run that went on is the one that wrote it."""
    train, valid = {}, {}
    looks_like_log = False
    for lineno, line in enumerate(text.splitlines(), start=1):
        if m := VALID_RE.search(line):
            looks_like_log = True
            if (value := _fields(m.group(2)).get(f"{LM_LOSS} value")) is not None:
                valid[int(m.group(1))] = _loss(path, lineno, value)
        elif m := TRAIN_RE.search(line):
            looks_like_log = True
            if (value := _fields(m.group(2)).get(LM_LOSS)) is not None:
                train[int(m.group(1))] = _loss(path, lineno, value)
        elif any(marker in line for marker in LOG_MARKERS):
            looks_like_log = True
    if not looks_like_log:
        return None
    if not train and not valid:
        raise InputError(f"{path}: a training log with no '{LM_LOSS}' line (did the run stop before its "
                         "first --log-interval?)")
    return train, valid


def evaluation_points(path: str, results) -> list[tuple[str, int, float]]:
    """[(series kind, step, lm loss)] of one evaluate.py JSON."""
    if not isinstance(results, dict) or "retrieval_off" not in results:
        raise InputError(f"{path}: JSON, but not written by tools/retro/evaluate.py (no 'retrieval_off')")
    step = results.get("step")
    if not isinstance(step, int):
        raise InputError(f"{path}: 'step' is {step!r}, not an iteration number")
    points = []
    for key, kind in MODES.items():
        if key not in results:
            continue
        loss = results[key].get("lm_loss") if isinstance(results[key], dict) else None
        if not isinstance(loss, (int, float)):
            raise InputError(f"{path}: '{key}' has no numeric 'lm_loss'")
        points.append((GPT if results.get("model") == "gpt" else kind, step, float(loss)))
    return points


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", errors="replace")
    except OSError as e:
        raise InputError(f"{path}: {e.strerror}") from None


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


class Runs:
    """train: {label: {iteration: lm loss}}; valid: {(label, kind): {iteration: lm loss}}, kind
    "log" or an evaluation mode. Both keep the inputs' order, which the legend and table follow."""

    def __init__(self):
        self.train: dict[str, dict[int, float]] = {}
        self.valid: dict[tuple[str, str], dict[int, float]] = {}
        self._log_paths: dict[str, str] = {}
        self._point_paths: dict[tuple[str, str, int], str] = {}

    def add_log(self, label: str, path: str, train: dict[int, float], valid: dict[int, float]):
        if label in self._log_paths:
            raise InputError(f"label {label!r} names two logs, {self._log_paths[label]} and {path}: "
                             "give them different LABEL=PATH")
        self._log_paths[label] = path
        if train:
            self.train[label] = dict(sorted(train.items()))
        if valid:
            self.valid[(label, LOG)] = dict(sorted(valid.items()))

    def add_evaluation(self, label: str | None, path: str, results):
        points = evaluation_points(path, results)
        label = label or str(results.get("model", "evaluation"))
        for kind, step, loss in points:
            if (other := self._point_paths.get((label, kind, step))) is not None:
                raise InputError(f"{other} and {path} both hold step {step} of {label!r}: "
                                 "give the runs different LABEL=PATH")
            self._point_paths[(label, kind, step)] = path
            series = self.valid.setdefault((label, kind), {})
            series[step] = loss
            self.valid[(label, kind)] = dict(sorted(series.items()))

    def add(self, arg: str):
        label, path = split_label(arg)
        if os.path.isdir(path):
            files = sorted(glob.glob(os.path.join(glob.escape(path), "*.json")))
            if not files:
                raise InputError(f"{path}: a directory with no *.json evaluation")
            label = label or os.path.basename(os.path.normpath(path))
            for file in files:
                results = _json(_read(file))
                if results is None:
                    raise InputError(f"{file}: not valid JSON (every *.json in {path} is read as an evaluation)")
                self.add_evaluation(label, file, results)
            return
        text = _read(path)
        if (results := _json(text)) is not None:
            self.add_evaluation(label, path, results)
        elif (parsed := parse_log(path, text)) is not None:
            self.add_log(label or os.path.splitext(os.path.basename(path))[0], path, *parsed)
        else:
            raise InputError(f"{path}: neither a log of pretrain_retro.py / pretrain_gpt.py (no 'iteration N/M |' "
                             "or 'validation loss at iteration' line) nor a tools/retro/evaluate.py JSON")

    def labels(self) -> list[str]:
        return list(dict.fromkeys([*self.train, *(label for label, _ in self.valid)]))


def series_name(label: str, kind: str) -> str:
    return f"{label} ({kind})"


def markdown_table(runs: Runs) -> str:
    columns = list(runs.valid)
    iterations = sorted({it for series in runs.valid.values() for it in series})
    lines = ["| iteration | " + " | ".join(series_name(*c) for c in columns) + " |",
             "|---:|" + "---:|" * len(columns)]
    for it in iterations:
        cells = [f"{runs.valid[c][it]:.4f}" if it in runs.valid[c] else "" for c in columns]
        lines.append(f"| {it} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise InputError("--output needs matplotlib: pip install -e .[plot]") from None
    matplotlib.use("Agg")  # files only: no display on a training box
    import matplotlib.pyplot as plt

    return plt


def plot(runs: Runs, output: str, title: str | None = None):
    plt = _pyplot()
    colours = {label: f"C{i % 10}" for i, label in enumerate(runs.labels())}
    fig, (train_ax, valid_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, series in runs.train.items():
        train_ax.plot(list(series), list(series.values()), color=colours[label], label=label)
    for (label, kind), series in runs.valid.items():
        linestyle, marker = STYLES[kind]
        valid_ax.plot(list(series), list(series.values()), color=colours[label], linestyle=linestyle,
                      marker=marker, markersize=4, fillstyle="none" if kind == LOG else "full",
                      label=series_name(label, kind))
    for ax, name, has_lines in ((train_ax, "training", runs.train), (valid_ax, "validation", runs.valid)):
        ax.set(xlabel="iteration", ylabel=f"{name} lm loss", title=f"{name} lm loss")
        ax.grid(alpha=0.3)
        if has_lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no {name} loss in the inputs", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    # Written beside the output and renamed, so a reader never sees half a figure.
    tmp = f"{output}.tmp-{os.getpid()}"
    try:
        fig.savefig(tmp, format=os.path.splitext(output)[1].lstrip(".") or "png", dpi=120)
        os.replace(tmp, output)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="[LABEL=]PATH",
                   help="training log, evaluate.py JSON, or directory of evaluate.py JSONs")
    p.add_argument("--output", default=None, help="figure to write (PNG unless the name says otherwise)")
    p.add_argument("--title", default=None)
    p.add_argument("--table", action="store_true", help="print the validation points as a markdown table")
    args = p.parse_args(argv)
    if not args.output and not args.table:
        p.error("nothing to do: give --output FIG.png and/or --table")
    runs = Runs()
    try:
        for arg in args.inputs:
            runs.add(arg)
        if args.table and not runs.valid:
            raise InputError("--table: the inputs hold no validation loss (logs without evaluations, no JSON)")
        if args.output:
            plot(runs, args.output, args.title)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.table:
        print(markdown_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
