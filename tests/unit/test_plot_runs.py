"""tools/plot_runs.py reads the trainer's log lines and evaluate.py's JSON, and draws and tabulates them."""

import json
import os
import sys

import pytest

from megatron.training.logging import format_train_line, format_validation_line
from tools.plot_runs import InputError, Runs, main, parse_log

TRAIN = {10: 7.123456, 20: 5.5, 30: 4.461854}
VALID = {20: 5.25, 30: 4.125}  # 30: the end-of-training line, with its " on validation set" suffix
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _train_line(iteration: int, loss: float) -> str:
    return format_train_line(
        iteration=iteration, train_iters=30, consumed_samples=8 * iteration, elapsed_ms=12.5, learning_rate=3e-4,
        global_batch_size=8, metrics={"lm loss": loss, "budget loss": 0.0125}, grad_norm=1.5, skipped_iterations=0,
        nan_iterations=0, tokens_per_second=1000.0, tflops_per_device=0.01, mfu=None)


def write_log(path, train=TRAIN, valid=VALID):
    lines = ["------------------------ arguments ------------------------", " > training ..."]
    for it, loss in train.items():
        lines.append(_train_line(it, loss))
        if it in valid:
            suffix = " on validation set" if it == max(valid) else ""
            line = format_validation_line(it, {"lm loss": valid[it], "budget loss": 0.5}, "lm loss", suffix)
            lines += ["-" * len(line), line, "-" * len(line)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def write_evaluation(path, step: int, on: float, off: float, random: float | None = None, model="retro"):
    results = {"step": step, "model": model, "num_samples": 16, "retrieval_off": {"loss": off, "lm_loss": off}}
    if model == "retro":
        results["retrieval_on"] = {"loss": on, "lm_loss": on, "ppl": 1.0, "gate_mean": 1.0}
        results["random_retrieval"] = {"loss": random, "lm_loss": random, "ppl": 1.0, "gate_mean": 1.0}
        results["copy_probe"] = {"ln_vocab": 6.9, "in_context": {"first": 6.9, "repeat": 1.0}}
    path.write_text(json.dumps(results, indent=2) + "\n")
    return str(path)


@pytest.fixture
def inputs(tmp_path):
    """A log, and a directory of RETRO evaluations whose file names sort against their steps."""
    log = write_log(tmp_path / "retro.log")
    evals = tmp_path / "evals"
    evals.mkdir()
    write_evaluation(evals / "a.json", 200, on=3.5, off=3.75, random=3.875)
    write_evaluation(evals / "b.json", 100, on=4.25, off=4.5, random=4.625)
    gpt = write_evaluation(tmp_path / "gpt_100.json", 100, on=None, off=4.375, model="gpt")
    return log, str(evals), gpt


def test_log_values_are_the_ones_written(tmp_path):
    path = write_log(tmp_path / "train.log")
    train, valid = parse_log(path, open(path).read())
    assert train == pytest.approx(TRAIN, rel=1e-6)  # the log keeps 7 significant digits
    assert valid == pytest.approx(VALID, rel=1e-6)


def test_log_lines_with_a_launcher_prefix_and_a_resumed_run(tmp_path):
    path = tmp_path / "resumed.log"
    path.write_text("[default0]:" + _train_line(10, 6.0) + "\n" + _train_line(10, 5.0) + "\n")
    train, valid = parse_log(str(path), path.read_text())
    assert train == {10: 5.0} and valid == {}  # the later line of a repeated iteration wins


def test_evaluations_group_by_label_and_sort_by_step(inputs):
    log, evals, gpt = inputs
    runs = Runs()
    for arg in (log, f"retro={evals}", gpt):
        runs.add(arg)
    assert list(runs.train) == ["retro"]
    assert runs.valid[("retro", "log")] == pytest.approx(VALID, rel=1e-6)
    assert list(runs.valid[("retro", "retrieval on")].items()) == [(100, 4.25), (200, 3.5)]
    assert runs.valid[("retro", "retrieval off")] == {100: 4.5, 200: 3.75}
    assert runs.valid[("retro", "random retrieval")] == {100: 4.625, 200: 3.875}
    assert runs.valid[("gpt", "GPT")] == {100: 4.375}  # a loose JSON is labelled by its model
    assert ("gpt", "retrieval off") not in runs.valid


def test_output_is_a_png_matplotlib_reads_back(inputs, tmp_path):
    import matplotlib.image

    log, evals, gpt = inputs
    out = tmp_path / "fig" / "loss.png"
    out.parent.mkdir()
    assert main([log, evals, gpt, "--output", str(out), "--title", "test run"]) == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    height, width = matplotlib.image.imread(str(out)).shape[:2]
    assert height >= 300 and width >= 800
    assert os.listdir(out.parent) == ["loss.png"]  # no temporary left beside it


def test_table_prints_the_validation_points(inputs, capsys):
    log, evals, gpt = inputs
    assert main([f"run={log}", f"run={evals}", gpt, "--table"]) == 0
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == ["iteration", "run (log)", "run (retrieval on)", "run (retrieval off)",
                       "run (random retrieval)", "gpt (GPT)"]
    assert rows[2:] == [["20", "5.2500", "", "", "", ""],
                        ["30", "4.1250", "", "", "", ""],
                        ["100", "", "4.2500", "4.5000", "4.6250", "4.3750"],
                        ["200", "", "3.5000", "3.7500", "3.8750", ""]]


def test_garbage_file_is_named(tmp_path, capsys):
    garbage = tmp_path / "notes.txt"
    garbage.write_bytes(b"\x00\xffnot a log\n")
    assert main([str(garbage), "--table"]) == 1
    err = capsys.readouterr().err
    assert str(garbage) in err and "neither a log" in err


def test_log_without_loss_lines_says_so(tmp_path):
    path = write_log(tmp_path / "crashed.log", train={}, valid={})
    with pytest.raises(InputError, match=r"crashed\.log: a training log with no 'lm loss' line"):
        Runs().add(path)


def test_json_that_is_not_an_evaluation_is_named(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"step": 3}')
    with pytest.raises(InputError, match=r"config\.json: JSON, but not written by tools/retro/evaluate\.py"):
        Runs().add(str(path))


def test_same_step_twice_under_one_label_is_refused(tmp_path):
    a = write_evaluation(tmp_path / "a.json", 100, on=4.0, off=4.5, random=4.6)
    b = write_evaluation(tmp_path / "b.json", 100, on=3.0, off=3.5, random=3.6)
    runs = Runs()
    runs.add(a)
    with pytest.raises(InputError, match=r"a\.json and .*b\.json both hold step 100 of 'retro'"):
        runs.add(b)
    runs.add(f"other={b}")  # a label keeps the runs apart


def test_missing_matplotlib_names_the_extra(inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert main([inputs[0], "--output", str(tmp_path / "x.png")]) == 1
    assert "pip install -e .[plot]" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
