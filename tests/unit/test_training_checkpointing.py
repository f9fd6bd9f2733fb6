"""DCP checkpoints: exact round trip, atomic publication, latest pointer, keep-last-N."""

import os
import pickle
import re
import shutil
import sys
from dataclasses import asdict

import pytest
import torch
from kill_during_save import dying_save

from megatron.models.gpt.model import GPTModel
from megatron.models.loss import lm_loss
from megatron.training import checkpointing as ckpt
from megatron.training.checkpointing import (
    TRACKER_FILE,
    TrainState,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from megatron.training.config import TrainingConfig
from megatron.training.lr_schedule import LRScheduler
from megatron.training.optimizer import build_optimizer
from megatron.transformer.config import ModelConfig

MODEL = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=8, vocab_size=32)
TRAIN = TrainingConfig(lr=1e-2, lr_warmup_iters=2, train_iters=10)


def _setup(seed=0):
    torch.manual_seed(seed)
    model = GPTModel(MODEL)
    model.init_weights()
    opt = build_optimizer(model, TRAIN)
    return model, opt, LRScheduler(opt, TRAIN)


def _step(model, opt, sched) -> float:
    tokens = torch.randint(0, MODEL.vocab_size, (2, MODEL.seq_length + 1))  # draws from the global RNG
    loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def _save(root, iteration, model, opt, sched, keep=None):
    return save_checkpoint(root, TrainState(iteration, 8 * iteration, 2 * iteration), model, opt, sched,
                           {"model": asdict(MODEL)}, keep_last_n=keep)


def test_resume_continues_bit_exactly(tmp_path):
    model, opt, sched = _setup()
    for _ in range(3):
        _step(model, opt, sched)
    _save(tmp_path, 3, model, opt, sched)
    expected = [_step(model, opt, sched) for _ in range(3)]

    model2, opt2, sched2 = _setup(seed=99)  # different weights and RNG until loaded
    state = load_checkpoint(str(tmp_path), model2, opt2, sched2, model_config=asdict(MODEL))
    assert state == TrainState(3, 24, 6)
    assert sched2.num_steps == 3
    assert [_step(model2, opt2, sched2) for _ in range(3)] == expected  # exact, not approximate
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name


def test_no_load_optim_and_rng_load_only_the_model(tmp_path):
    model, opt, sched = _setup()
    _step(model, opt, sched)
    _save(tmp_path, 1, model, opt, sched)
    model2, opt2, sched2 = _setup(seed=5)
    torch.manual_seed(123)
    load_checkpoint(str(tmp_path), model2, opt2, sched2, load_optim=False, load_rng=False)
    assert torch.equal(model2.tok_embeddings.weight, model.tok_embeddings.weight)
    assert opt2.state == {} and sched2.num_steps == 0
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(123).get_state())


def test_layout_tracker_and_only_complete_directories_load(tmp_path):
    model, opt, sched = _setup()
    root = str(tmp_path)
    path = _save(root, 2, model, opt, sched)
    assert os.path.basename(path) == "iter_0000002"
    assert {".metadata", "config.json"} <= set(os.listdir(path))
    assert open(os.path.join(root, TRACKER_FILE)).read() == "2\n"
    assert sorted(os.listdir(root)) == ["iter_0000002", TRACKER_FILE]  # no temporary names left

    # A newer but unfinished save (temporary name) and a directory without DCP's .metadata.
    shutil.copytree(path, os.path.join(root, "iter_0000007.tmp-4242"))
    os.makedirs(os.path.join(root, "iter_0000009"))
    shutil.copy(os.path.join(path, "config.json"), os.path.join(root, "iter_0000009"))
    assert find_checkpoint(root) == (2, path)
    os.remove(os.path.join(root, TRACKER_FILE))
    assert find_checkpoint(root) == (2, path)  # no tracker: newest complete directory
    with pytest.raises(ValueError, match="iter_0000009"):
        find_checkpoint(root, step=9)
    assert find_checkpoint(str(tmp_path / "empty")) is None
    assert load_checkpoint(str(tmp_path / "empty"), model) is None


def test_kill_during_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    class Killed(Exception):
        pass

    def die():
        raise Killed

    model, opt, sched = _setup()
    root = str(tmp_path)
    _save(root, 1, model, opt, sched)
    expected = model.tok_embeddings.weight.detach().clone()
    _step(model, opt, sched)
    monkeypatch.setattr(ckpt.dcp, "save", dying_save(2, die))
    with pytest.raises(Killed):
        _save(root, 2, model, opt, sched)
    leftovers = sorted(os.listdir(root))
    assert leftovers == ["iter_0000001", f"iter_0000002.tmp-{os.getpid()}", TRACKER_FILE]
    assert open(os.path.join(root, TRACKER_FILE)).read() == "1\n"

    model2, opt2, sched2 = _setup(seed=3)
    assert load_checkpoint(root, model2, opt2, sched2).iteration == 1
    assert torch.equal(model2.tok_embeddings.weight, expected)

    monkeypatch.undo()
    _save(root, 2, model2, opt2, sched2)  # a later successful save clears the debris
    assert sorted(os.listdir(root)) == ["iter_0000001", "iter_0000002", TRACKER_FILE]


def test_keep_last_n_deletes_older_complete_checkpoints(tmp_path):
    model, opt, sched = _setup()
    root = str(tmp_path)
    _save(root, 9, model, opt, sched)  # from a run this one was resumed before: not older
    for it in range(1, 6):
        _save(root, it, model, opt, sched, keep=2)
    assert [it for it, _ in list_checkpoints(root)] == [4, 5, 9]
    assert open(os.path.join(root, TRACKER_FILE)).read() == "5\n"
    _save(root, 5, model, opt, sched, keep=2)  # the same iteration saved again replaces it
    assert [it for it, _ in list_checkpoints(root)] == [4, 5, 9]


def test_a_different_architecture_is_refused_by_name(tmp_path):
    model, opt, sched = _setup()
    _save(tmp_path, 1, model, opt, sched)
    other = asdict(MODEL) | {"normalization": "LayerNorm"}
    with pytest.raises(ValueError, match="normalization"):
        load_checkpoint(str(tmp_path), model, opt, sched, model_config=other)
    dropout_changed = asdict(MODEL) | {"hidden_dropout": 0.1}
    assert load_checkpoint(str(tmp_path), model, opt, sched, model_config=dropout_changed).iteration == 1


def test_a_checkpoint_saved_before_a_model_field_existed_loads_with_its_default(tmp_path):
    model, opt, sched = _setup()
    _save(tmp_path, 1, model, opt, sched)
    older = {k: v for k, v in asdict(MODEL).items() if k not in ("num_query_groups", "add_qkv_bias")}
    ckpt.check_model_config(older, asdict(MODEL), "CKPT")
    with pytest.raises(ValueError, match="qkv"):
        ckpt.check_model_config(older, asdict(MODEL) | {"add_qkv_bias": True}, "CKPT")


def test_a_mismatch_names_the_flag_given_not_a_field_derived_from_it():
    def refused(saved, current):
        with pytest.raises(ValueError) as e:
            ckpt.check_model_config(asdict(saved), asdict(current), "CKPT")
        return str(e.value)

    hidden_64 = ModelConfig(hidden_size=64, num_attention_heads=2, vocab_size=512)
    # ffn_hidden_size follows from --hidden-size and sorts first: it was the one blamed
    assert refused(hidden_64, ModelConfig(hidden_size=128, num_attention_heads=2, vocab_size=512)) == (
        "CKPT: checkpoint was saved with --hidden-size 64, this run has --hidden-size 128")
    assert refused(hidden_64, ModelConfig(hidden_size=64, num_attention_heads=2, vocab_size=512, swiglu=False)) == (
        "CKPT: checkpoint was saved with --swiglu, this run has --no-swiglu")
    assert refused(hidden_64, ModelConfig(hidden_size=64, num_attention_heads=2, vocab_size=512, seq_length=512)) == (
        "CKPT: checkpoint was saved with --seq-length 256, this run has --seq-length 512")
    assert refused(hidden_64, ModelConfig(hidden_size=64, num_attention_heads=2, vocab_size=640)).startswith(
        "CKPT: checkpoint was saved with a padded vocabulary of 512, this run has 640: another tokenizer")
    assert refused(hidden_64, ModelConfig(hidden_size=64, num_attention_heads=2, vocab_size=512,
                                          ffn_hidden_size=100)) == (
        "CKPT: checkpoint was saved with --ffn-hidden-size 192, this run has --ffn-hidden-size 100")


class _Planted:
    """What a malicious checkpoint holds: unpickling it runs code, here creating `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


class _PlantedScheduler:
    def __init__(self, marker):
        self.marker = marker

    def state_dict(self):
        return {"num_steps": _Planted(self.marker)}


def _plant_metadata(path, marker):
    with open(os.path.join(path, ckpt.METADATA_FILE), "wb") as f:
        pickle.dump(_Planted(marker), f)


def _loaders():
    """Every entry point that reads a checkpoint (evaluate.py, text_generation.py and
    pretrain_*.py --load go through load_checkpoint)."""
    from megatron.training import retro_fit
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools", "checkpoint"))
    import convert
    return {
        "load_checkpoint": lambda root, model: load_checkpoint(root, model, load_rng=False),
        "convert.py": lambda root, model: convert.convert(root, os.path.join(root, "export")),
        "--retro-fit-from": lambda root, model: retro_fit.load_gpt_into_retro(root, model, asdict(MODEL)),
    }


@pytest.mark.parametrize("entry_point", ["load_checkpoint", "convert.py", "--retro-fit-from"])
def test_a_planted_metadata_pickle_is_refused_by_every_loader_and_never_runs(tmp_path, entry_point):
    model, opt, sched = _setup()
    root = str(tmp_path / "ckpt")
    path = _save(root, 1, model, opt, sched)
    marker = str(tmp_path / "pwned")
    _plant_metadata(path, marker)
    with pytest.raises(ckpt.UntrustedCheckpointError, match=re.escape(os.path.join(path, ".metadata"))):
        _loaders()[entry_point](root, model)
    assert not os.path.exists(marker)


def test_a_planted_non_tensor_entry_is_refused_naming_its_file_and_never_runs(tmp_path):
    model, opt, sched = _setup()
    planted = _PlantedScheduler(str(tmp_path / "pwned"))
    path = save_checkpoint(str(tmp_path / "ckpt"), TrainState(1), model, opt, planted, {"model": asdict(MODEL)})
    with pytest.raises(ckpt.UntrustedCheckpointError, match=re.escape(path) + r".*\.distcp.*scheduler\.num_steps"):
        load_checkpoint(str(tmp_path / "ckpt"), model, opt, sched)
    assert not os.path.exists(planted.marker)
