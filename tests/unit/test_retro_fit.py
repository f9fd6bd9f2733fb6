"""RETRO-fitting (--retro-fit-from): a GPT checkpoint of this project is loaded into the RetroModel's
decoder and frozen; only the encoder, CCA (+ cca_norm) and gates train; checkpoints hold every
parameter and a fitted run resumes exactly."""

import dataclasses

import numpy as np
import pytest
import torch

from megatron.models.loss import LM_LOSS, lm_loss
from megatron.models.retro.config import RetroConfig
from megatron.models.retro.model import RetroModel
from megatron.training import retro_config, retro_fit, retro_step
from megatron.training.arguments import parse_args
from megatron.training.checkpointing import load_checkpoint
from megatron.training.trainer import pretrain

VOCAB, SEQ, M, K = 64, 16, 4, 2
RETRO_MODULES = {"encoder", "cca", "cca_gate", "cca_norm", "gate"}  # what RETRO adds to a decoder layer


def is_retro_only(name: str) -> bool:
    return name.startswith("layers.") and name.split(".")[2] in RETRO_MODULES


class CopyDataset:
    """Random text (nothing to learn from the context) whose chunk u's first neighbour holds what
    follows chunk u (chunks u+1 and u+2): retrieval tells the model the text it must predict.
    The second neighbour is noise. `seed` keeps the GPT's and the fitting's samples apart."""

    def __init__(self, n, seed):
        self.n, self.seed = n, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rng = np.random.default_rng((self.seed, i))
        text = rng.integers(0, VOCAB, SEQ + 1 + 2 * M)
        l = SEQ // M
        neighbors = np.stack([np.stack([text[(u + 1) * M:(u + 3) * M], rng.integers(0, VOCAB, 2 * M)])
                              for u in range(l)])
        return {"text": text[:SEQ + 1], "neighbor_tokens": neighbors, "neighbor_mask": np.ones((l, K), dtype=bool)}


def datasets(cfg, counts):
    return CopyDataset(counts[0], seed=int(cfg.retro.add_retriever)), None, None


def config(add_retriever: bool, iters: int, *extra, fit_from=None, gate=False):
    # A larger init than Megatron's 0.02: the frozen tied embedding of a GPT trained for a few
    # steps must span logits wide enough for copying to pay (a trained GPT's does).
    cfg = parse_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length",
                      str(SEQ), "--micro-batch-size", "8", "--global-batch-size", "8", "--train-iters", str(iters),
                      "--lr", "1e-2", "--lr-decay-style", "constant", "--eval-iters", "0", "--log-interval", "1",
                      "--peak-tflops", "1", "--weight-decay", "0.1", "--init-method-std", "0.1", *extra])
    cfg.model.vocab_size = VOCAB
    cfg.retro = retro_config.RetroTrainingConfig(
        add_retriever=add_retriever, fit_from=fit_from,
        model=RetroConfig(chunk_length=M, num_neighbors=K, decoder_layers=[2], encoder_num_layers=1,
                          attention_gate=gate, cca_gate_init=0.5))
    return cfg


def run(cfg):
    return pretrain(cfg, retro_step.model_provider, retro_step.make_forward_step(cfg), datasets,
                    post_init_fn=retro_fit.post_init)


def load_model(cfg, root):
    with torch.device("cpu"):
        model = retro_step.model_provider(cfg)
    assert load_checkpoint(root, model, load_rng=False) is not None
    return model


@pytest.fixture(scope="module")
def gpt_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt")
    cfg = config(False, 8, "--save", str(root / "ckpt"))
    run(cfg)
    return str(root / "ckpt"), load_model(cfg, str(root / "ckpt"))


def test_retro_fitting_freezes_the_gpt_bit_identically_and_lowers_the_loss(gpt_checkpoint, tmp_path, capsys):
    gpt_dir, gpt = gpt_checkpoint
    cfg = config(True, 60, "--save", str(tmp_path / "fit"), fit_from=gpt_dir, gate=True)
    summary = run(cfg)
    assert "RETRO-fitting: loaded and froze" in capsys.readouterr().out
    losses = [m[LM_LOSS] for _, m in summary["train_history"]]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.15, losses

    fitted = load_model(cfg, str(tmp_path / "fit"))
    gpt_params = dict(gpt.named_parameters())
    names = [name for name, _ in fitted.named_parameters()]
    assert set(gpt_params) == {name for name in names if not is_retro_only(name)}
    for name, param in fitted.named_parameters():
        if not is_retro_only(name):  # every decoder parameter: exactly the GPT's, after 30 steps with weight decay
            assert torch.equal(param, gpt_params[name]), name

    # On unseen samples the fitted model, reading its neighbours, beats the GPT it was fitted to.
    held_out = [CopyDataset(16, seed=2)[i] for i in range(16)]
    batch = {key: torch.from_numpy(np.stack([item[key] for item in held_out])) for key in held_out[0]}
    tokens, labels = batch["text"][:, :-1], batch["text"][:, 1:]
    with torch.no_grad():
        fitted_loss = lm_loss(fitted.eval()(tokens, batch["neighbor_tokens"], batch["neighbor_mask"]), labels)
        gpt_loss = lm_loss(gpt.eval()(tokens), labels)
    assert fitted_loss < gpt_loss - 0.1, (float(fitted_loss), float(gpt_loss))

    # What the hook leaves trainable: exactly what RETRO adds, gates included.
    model = RetroModel(cfg.model, cfg.retro.model)
    model.init_weights()
    retro_fit.post_init(model, cfg)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name in names if is_retro_only(name)}
    assert any(name.endswith("gate.logit_full") for name in trainable)


def test_retro_fitting_resumes_exactly(gpt_checkpoint, tmp_path):
    gpt_dir, _ = gpt_checkpoint
    straight = config(True, 6, "--save", str(tmp_path / "a"), fit_from=gpt_dir)
    run(straight)
    run(config(True, 6, "--save", str(tmp_path / "b"), "--exit-interval", "3", fit_from=gpt_dir))
    resumed = run(config(True, 6, "--save", str(tmp_path / "b"), "--load", str(tmp_path / "b"), fit_from=gpt_dir))
    assert resumed["iteration"] == 6 and len(resumed["train_history"]) == 3
    a, b = load_model(straight, str(tmp_path / "a")), load_model(straight, str(tmp_path / "b"))
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


def test_retro_fit_from_refuses_a_retro_checkpoint_and_another_architecture(gpt_checkpoint, tmp_path):
    gpt_dir, _ = gpt_checkpoint
    cfg = config(True, 1, "--save", str(tmp_path / "r"))
    run(cfg)
    model = RetroModel(cfg.model, cfg.retro.model)
    with pytest.raises(ValueError, match="RETRO checkpoint"):
        retro_fit.load_gpt_into_retro(str(tmp_path / "r"), model, dataclasses.asdict(cfg.model))
    wider = dataclasses.replace(cfg.model, hidden_size=64)
    with pytest.raises(ValueError, match="saved with --hidden-size 32, this run has --hidden-size 64"):
        retro_fit.load_gpt_into_retro(gpt_dir, RetroModel(wider, cfg.retro.model), dataclasses.asdict(wider))
    with pytest.raises(ValueError, match="no complete checkpoint"):
        retro_fit.load_gpt_into_retro(str(tmp_path / "none"), model, dataclasses.asdict(cfg.model))


def test_a_gpt_run_refuses_a_retro_checkpoint_and_a_retro_run_a_gpt_one_naming_the_flag(gpt_checkpoint, tmp_path):
    gpt_dir, _ = gpt_checkpoint
    run(config(True, 1, "--save", str(tmp_path / "r")))
    with pytest.raises(ValueError, match="RETRO checkpoint.*add --retro-add-retriever"):
        run(config(False, 2, "--load", str(tmp_path / "r")))
    with pytest.raises(ValueError, match="GPT checkpoint.*--retro-add-retriever.*--retro-fit-from"):
        run(config(True, 9, "--load", gpt_dir))
