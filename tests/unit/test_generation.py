"""Generation: the KV-cached incremental decoder against the full forward, sampling filters,
live retrieval from a real work dir, and the text_generation.py tool."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron.inference.decoder import IncrementalDecoder
from megatron.inference.generation import SamplingConfig, generate, sample_token
from megatron.models.gpt.model import GPTModel
from megatron.models.retro.config import RetroConfig
from megatron.models.retro.model import RetroModel
from megatron.transformer.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
V, M, K = 64, 4, 2


def tiny_retro(gate=False, encoder_cross_attention="first", seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=32)
    model = RetroModel(cfg, RetroConfig(chunk_length=M, num_neighbors=K, decoder_layers=[2, 4], attention_gate=gate, cca_gate_init=0.5,
                                        encoder_cross_attention=encoder_cross_attention))
    model.init_weights()
    if gate:  # end logits away from the start, different per layer and per overlap
        for i, layer in enumerate(model.layers.values()):
            if getattr(layer, "gate", None) is not None:
                layer.gate.logit_none.data.fill_((0.3 + i) / layer.gate.logit_scale)
                layer.gate.logit_full.data.fill_((-1.0 - i) / layer.gate.logit_scale)
    return model.eval()


def incremental_logits(model, tokens, sizes, neighbor_tokens=None, neighbor_mask=None):
    """Feed `tokens` in steps of `sizes`, handing each step the neighbours of the chunks it completes."""
    decoder = IncrementalDecoder(model)
    outs, p = [], 0
    for n in sizes:
        neighbors = {}
        if neighbor_tokens is not None:
            neighbors = {u: (neighbor_tokens[:, u], neighbor_mask[:, u]) for u in decoder.chunks_completed_by(p, p + n)}
        outs.append(decoder.step(tokens[:, p:p + n], neighbors))
        p += n
    assert p == tokens.shape[1]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("gate,encoder_xattn", [(False, "first"), (True, "first"), (False, "all")])
@pytest.mark.parametrize("prefill", [1, 3, 4, 9])
def test_cached_incremental_logits_equal_the_full_forward_across_chunk_boundaries(gate, encoder_xattn, prefill):
    model = tiny_retro(gate, encoder_xattn)
    s = 15  # 3 whole chunks and a partial one: 3 boundaries crossed one token at a time
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (2, s), generator=g)
    l = -(-s // M)
    neighbor_tokens = torch.randint(0, V, (2, l, K, 2 * M), generator=g)
    neighbor_mask = torch.rand(2, l, K, generator=g) > 0.3
    neighbor_mask[0, 1] = False  # a chunk without any neighbour
    neighbor_mask[1, 1, 0] = True  # and one with a neighbour that shares no bigram with it
    # Neighbours holding all of chunk 0 and 2 of chunk 2's 3 bigrams: the gates read the overlap.
    neighbor_tokens[:, 0, :, :M] = tokens[:, None, :M]
    neighbor_tokens[:, 2, :, 1:M] = tokens[:, None, 2 * M + 1:3 * M]
    full = model(tokens, neighbor_tokens, neighbor_mask)
    if gate:
        values, real = model.chunk_gates()
        assert len({round(float(v), 4) for v in values[real]}) == 3
    # The neighbours matter, so equality below is not retrieval being ignored.
    assert (full - model(tokens)).abs().max() > 1e-3

    inc = incremental_logits(model, tokens, [prefill] + [1] * (s - prefill), neighbor_tokens, neighbor_mask)
    torch.testing.assert_close(inc, full, rtol=1e-5, atol=1e-5)
    # Multi-token steps that complete one or two chunks each.
    sizes = [prefill, 5, s - prefill - 5]
    inc = incremental_logits(model, tokens, sizes, neighbor_tokens, neighbor_mask)
    torch.testing.assert_close(inc, full, rtol=1e-5, atol=1e-5)


def test_without_neighbours_the_cached_decoder_equals_the_full_forward_of_gpt_and_retro():
    model = tiny_retro()
    tokens = torch.randint(0, V, (1, 13), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(incremental_logits(model, tokens, [5] + [1] * 8), model(tokens), rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    gpt = GPTModel(model.cfg)
    gpt.init_weights()
    gpt.eval()
    torch.testing.assert_close(incremental_logits(gpt, tokens, [2] + [1] * 11), gpt(tokens), rtol=1e-5, atol=1e-5)


def test_decoder_refuses_neighbours_handed_to_the_wrong_step_and_positions_past_the_end():
    model = tiny_retro()
    decoder = IncrementalDecoder(model, max_length=6)
    nb = (torch.zeros(1, K, 2 * M, dtype=torch.long), torch.ones(1, K, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk 1"):
        decoder.step(torch.zeros(1, 2, dtype=torch.long), {1: nb})
    decoder.step(torch.zeros(1, 4, dtype=torch.long), {0: nb})
    with pytest.raises(ValueError, match="beyond"):
        decoder.step(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="eval mode"):
        IncrementalDecoder(model.train())


class FakeRetriever:
    """Deterministic neighbours derived from the chunk's tokens, recording what it was asked."""

    chunk_length = M
    seconds = 0.0

    def __init__(self):
        self.asked = []

    def retrieve(self, chunks):
        chunks = np.asarray(chunks)
        self.asked += [tuple(c) for c in chunks]
        tokens = np.stack([(np.tile(c, 2)[None] + np.arange(K)[:, None]) % V for c in chunks])
        ids = np.tile(np.arange(K), (len(chunks), 1))
        mask = np.ones((len(chunks), K), dtype=bool)
        mask[:, -1] = chunks[:, 0] % 2 == 0  # sometimes only one neighbour
        return ids, tokens, mask


def test_generate_retrieves_every_completed_chunk_and_matches_greedy_full_forward_decoding():
    model = tiny_retro(gate=True)
    retriever = FakeRetriever()
    prompt = [5, 9, 1, 3, 7, 2]  # completes chunk 0 inside the prompt
    out = generate(model, prompt, 20, retriever, SamplingConfig(greedy=True))
    assert len(out.tokens) == 26
    assert [r.chunk for r in out.retrievals] == list(range(26 // M))  # chunk 6 (tokens 24..27) never completes
    assert retriever.asked == [tuple(out.tokens[u * M:(u + 1) * M]) for u in range(26 // M)]

    # Greedy decoding by full forwards over the whole text, neighbours of every completed chunk.
    tokens = list(prompt)
    while len(tokens) < 26:
        t = torch.tensor([tokens])
        l = -(-len(tokens) // M)
        nt = torch.zeros(1, l, K, 2 * M, dtype=torch.long)
        nm = torch.zeros(1, l, K, dtype=torch.bool)
        for u in range(len(tokens) // M):
            _, tok, mask = FakeRetriever().retrieve(np.array([tokens[u * M:(u + 1) * M]]))
            nt[0, u], nm[0, u] = torch.from_numpy(tok[0]), torch.from_numpy(mask[0])
        tokens.append(int(model(t, nt, nm)[0, -1].argmax()))
    assert out.tokens == tokens


def test_generate_stops_at_eod_and_at_the_last_position_and_never_samples_padding():
    model = tiny_retro()
    out = generate(model, [1, 2, 3], 100, None, SamplingConfig(greedy=True))
    assert len(out.tokens) == 32  # the model's positions
    first = out.generated[0]
    out = generate(model, [1, 2, 3], 100, None, SamplingConfig(greedy=True), eod=first)
    assert out.generated == [first]
    out = generate(model, [1, 2, 3], 20, None, SamplingConfig(temperature=1.0), vocab_size=10,
                   generator=torch.Generator().manual_seed(0))
    assert max(out.generated) < 10
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 3)


def test_sampling_filters():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9, -1.0])
    assert sample_token(logits, SamplingConfig(greedy=True)) == 1
    assert sample_token(logits, SamplingConfig(temperature=0.0)) == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample_token(logits, SamplingConfig(top_k=2), g) for _ in range(200)}
    assert draws == {1, 3}
    # top-p: 1 and 3 hold ~0.84 of the mass, 2 brings it over 0.9
    draws = {sample_token(logits, SamplingConfig(top_p=0.8), g) for _ in range(200)}
    assert draws == {1, 3}
    draws = {sample_token(logits, SamplingConfig(top_p=0.01), g) for _ in range(50)}
    assert draws == {1}
    draws = {sample_token(logits, SamplingConfig(temperature=100.0), g) for _ in range(300)}
    assert draws == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0.0)


# ------------------------------------------------------------ a real work dir (slow)

SEQ = 128  # the --seq-length of the `workspace` fixture's work dir (tests/conftest.py)


def retro_for_workdir(vocab_size: int, seed=0, gate=False):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, num_layers=2, hidden_size=32, num_attention_heads=2, seq_length=SEQ)
    model = RetroModel(cfg, RetroConfig(chunk_length=64, num_neighbors=2, decoder_layers=[2], encoder_num_layers=1,
                                        cca_gate_init=0.5, attention_gate=gate))
    model.init_weights()
    if gate:  # a gate that opens with the overlap: end logits -1 and 2
        gate_module = model.layers["1"].gate
        gate_module.logit_none.data.fill_(-1.0 / gate_module.logit_scale)
        gate_module.logit_full.data.fill_(2.0 / gate_module.logit_scale)
    return model.eval()


@pytest.mark.slow
def test_live_retrieval_finds_the_prompt_documents_own_chunks(workspace):
    from megatron.data.tokenizers import build_tokenizer
    from megatron.inference.retrieval import LiveRetriever
    from megatron.retrieval.chunk_db import ChunkDB

    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(workspace["tokenizer"]))
    db = ChunkDB(str(workspace["work_dir"]))
    # A DB document with at least two whole chunks, no EOD inside them.
    chunks = np.asarray(db.chunks)
    doc_start = next(c for c in range(len(chunks) - 2) if chunks[c, 2] == 0 and chunks[c + 1, 3] == 64
                     and db.valid[c] and db.valid[c + 1])
    prompt = db.get_tokens([doc_start])[0].tolist()  # chunk c and its continuation c + 1: 128 tokens
    assert tokenizer.eod not in prompt
    retriever = LiveRetriever(str(workspace["work_dir"]), tokenizer, num_neighbors=2)
    model = retro_for_workdir(128 * -(-tokenizer.vocab_size // 128))
    out = generate(model, prompt[:64 + 10], 30, retriever, SamplingConfig(greedy=True), vocab_size=tokenizer.vocab_size)
    assert [r.chunk for r in out.retrievals] == [0]
    assert doc_start in out.retrievals[0].neighbor_ids.tolist()  # exact index: the chunk finds itself
    assert retriever.seconds > 0 and out.retrieval_seconds > 0
    # The document's next chunk finds itself too.
    ids, _, mask = retriever.retrieve(np.array([prompt[64:128]]))
    assert doc_start + 1 in ids[0][mask[0]].tolist()

    # Aligned (--retro-align-neighbors): a chunk found 10 tokens into a DB chunk is read from there.
    aligned = LiveRetriever(str(workspace["work_dir"]), tokenizer, num_neighbors=2, align_neighbors=True)
    query = np.array([prompt[10:74]])
    ids, tokens, mask = aligned.retrieve(query)
    own = [j for j in range(2) if mask[0, j] and ids[0, j] in (doc_start, doc_start + 1)]
    assert own and all(np.array_equal(tokens[0, j, :64], query[0]) for j in own)

    random_retriever = LiveRetriever(str(workspace["work_dir"]), tokenizer, num_neighbors=2, mode="random", seed=3)
    ids, tokens, mask = random_retriever.retrieve(np.array([prompt[:64]]))
    assert mask.all() and db.valid[ids[0]].all() and tokens.shape == (1, 2, 128)


@pytest.mark.slow
def test_text_generation_tool_shows_neighbours_for_each_chunk(workspace, tmp_path):
    from megatron.data.config import DataConfig
    from megatron.data.tokenizers import build_tokenizer
    from megatron.models.retro.config import RetroConfig as RC
    from megatron.training.checkpointing import TrainState, save_checkpoint
    from megatron.training.config import Config
    from megatron.training.retro_config import RetroTrainingConfig

    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(workspace["tokenizer"]))
    model = retro_for_workdir(128 * -(-tokenizer.vocab_size // 128))
    cfg = Config(model=model.cfg, data=DataConfig(tokenizer_type="HuggingFaceTokenizer",
                                                  tokenizer_model=str(workspace["tokenizer"])))
    cfg.retro = RetroTrainingConfig(add_retriever=True, work_dir=str(workspace["work_dir"]),
                                             model=RC(**dataclasses.asdict(model.retro_cfg)))
    save_checkpoint(str(tmp_path / "ckpt"), TrainState(iteration=1), model, None, None, dataclasses.asdict(cfg))

    prompt_file = tmp_path / "prompt.txt"
    with open(os.path.join(REPO, "tools", "retro", "text_generation.py")) as f:
        prompt_file.write_text(f.read()[:160])  # ~100 tokens: chunk 0 and part of 1
    base = [sys.executable, "tools/retro/text_generation.py", "--load", str(tmp_path / "ckpt"), "--retro-work-dir",
            str(workspace["work_dir"]), "--max-new-tokens", "20", "--top-k", "5", "--temperature", "0.7"]
    proc = subprocess.run(base + ["--prompt-file", str(prompt_file), "--show-neighbors"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--- chunk 0" in proc.stdout and "neighbour 1 (chunk" in proc.stdout
    assert proc.stdout.split("--- text:\n", 1)[1].startswith(prompt_file.read_text())
    off = subprocess.run(base + ["--retrieval", "off"], input="import os\n", cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert off.returncode == 0 and off.stdout.startswith("import os\n") and "retrieval off" in off.stderr
    bad = subprocess.run(base + ["--prompt-file", str(tmp_path / "missing.txt")], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 1 and "missing.txt" in bad.stderr


@pytest.mark.slow
def workdir_retro_and_config(workspace, gate=False):
    """A tiny RETRO for the fixture's work dir and the run config a checkpoint of it records."""
    from megatron.data.config import DataConfig
    from megatron.data.tokenizers import build_tokenizer
    from megatron.training.config import Config, TrainingConfig
    from megatron.training.retro_config import RetroTrainingConfig

    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(workspace["tokenizer"]))
    model = retro_for_workdir(128 * -(-tokenizer.vocab_size // 128), gate=gate)
    cfg = Config(model=model.cfg,
                 data=DataConfig(data_path=[str(workspace["ws"] / "data" / "stdlib_text_document")], split="75,25,0",
                                 tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(workspace["tokenizer"])),
                 training=TrainingConfig(micro_batch_size=2, global_batch_size=2, train_iters=4, eval_interval=4,
                                         eval_iters=1))
    cfg.retro = RetroTrainingConfig(add_retriever=True, work_dir=str(workspace["work_dir"]),
                                             model=dataclasses.replace(model.retro_cfg))
    return model, cfg


def test_evaluate_overlap_buckets_partition_the_chunks_and_their_loss(workspace, tmp_path):
    """evaluate.py --overlap-buckets (and --copy-probe) on the same work dir (it lives here for
    the fixture): the buckets hold every scored chunk once, and their chunk-weighted losses give
    back the mean loss over the scored positions of a direct forward."""
    from megatron.training import retro_checkpoint, retro_data
    from megatron.training.checkpointing import TrainState, save_checkpoint
    from megatron.training.copy_probe import copy_probe
    from megatron.training.trainer import sample_counts
    from tools.retro.evaluate import OVERLAP_BUCKETS, evaluate

    model, cfg = workdir_retro_and_config(workspace)
    save_checkpoint(str(tmp_path / "ckpt"), TrainState(iteration=4), model, None, None, dataclasses.asdict(cfg))

    results = evaluate(str(tmp_path / "ckpt"), str(workspace["work_dir"]), eval_samples=4, overlap_buckets=True,
                       probe=True)
    # --copy-probe scores the loaded checkpoint as the probe scores the saved model.
    direct = copy_probe(model, model.cfg.vocab_size, SEQ, 64, model.retro_cfg.num_neighbors)
    probed = results["copy_probe"]
    assert probed["in_context"] == pytest.approx(direct["in_context"], rel=1e-4)
    for offset, losses in direct["from_neighbors"].items():
        assert probed["from_neighbors"][offset] == pytest.approx(losses, rel=1e-4)
    assert set(probed["from_neighbors"]) == {"0", "23"}
    buckets = results["overlap_buckets"]
    assert list(buckets) == [name for name, _ in OVERLAP_BUCKETS] and results["overlap_ngram"] == 13
    assert sum(b["chunks"] for b in buckets.values()) == results["num_samples"] * (SEQ // 64 - 1)
    scored = sum(b["chunks"] for b in buckets.values())
    on = sum(b["lm_loss_on"] * b["chunks"] for b in buckets.values() if b["chunks"]) / scored
    off = sum(b["lm_loss_off"] * b["chunks"] for b in buckets.values() if b["chunks"]) / scored

    # The same samples by hand: chunk 1's tokens are predicted at positions 63 .. 126.
    cfg = retro_checkpoint.config_from_checkpoint(str(tmp_path / "ckpt" / "iter_0000004"),
                                               str(workspace["work_dir"]))
    retro_data.prepare(cfg)
    _, valid, _ = retro_data.datasets(cfg, sample_counts(cfg), retrieval="on", training=False)
    items = [valid[i] for i in range(results["num_samples"])]
    batch = {key: torch.from_numpy(np.stack([item[key] for item in items])) for key in ("text", "neighbor_tokens",
                                                                                        "neighbor_mask")}
    tokens, labels = batch["text"][:, :-1], batch["text"][:, 1:]
    for mask, expected in ((batch["neighbor_mask"], on), (torch.zeros_like(batch["neighbor_mask"]), off)):
        with torch.no_grad():
            logits = model(tokens, batch["neighbor_tokens"], mask)
        loss = torch.nn.functional.cross_entropy(logits[:, 63:127].flatten(0, 1), labels[:, 63:127].flatten())
        assert float(loss) == pytest.approx(expected, rel=1e-4)
    assert on != off  # the neighbours reach the scored positions


def test_aligned_neighbours_are_what_evaluation_reads_and_old_checkpoints_stay_as_trained(workspace, tmp_path):
    import json

    from megatron.retrieval.chunk_db import ChunkDB
    from megatron.retrieval.neighbors import load_neighbors
    from megatron.training import retro_checkpoint, retro_data
    from megatron.training.checkpointing import CONFIG_FILE, TrainState, save_checkpoint
    from megatron.training.trainer import sample_counts

    model, cfg = workdir_retro_and_config(workspace)
    assert cfg.retro.model.align_neighbors  # the default
    save_checkpoint(str(tmp_path / "ckpt"), TrainState(iteration=4), model, None, None, dataclasses.asdict(cfg))
    path = str(tmp_path / "ckpt" / "iter_0000004")
    cfg = retro_checkpoint.config_from_checkpoint(path, str(workspace["work_dir"]))
    retro_data.prepare(cfg)
    _, valid, _ = retro_data.datasets(cfg, sample_counts(cfg), retrieval="on", training=False)
    db, ids = ChunkDB(str(workspace["work_dir"])), load_neighbors(str(workspace["work_dir"]), "valid")
    item = valid[0]
    chunks = item["text"][:SEQ].reshape(-1, 64)
    k = cfg.retro.model.num_neighbors
    assert np.array_equal(item["neighbor_tokens"], db.get_tokens(ids[0, :, :k], align_to=chunks))
    assert not np.array_equal(item["neighbor_tokens"], db.get_tokens(ids[0, :, :k]))  # some neighbour moved

    # A checkpoint written before the fields existed was trained on unaligned neighbours, with
    # the paper's encoder (no embedding skip), its retrieval path trained the neighbours'
    # embedding, and their gate read its logits unscaled; it saved
    # the retro section as extra["retro"], from before Config had a typed one.
    config_file = os.path.join(path, CONFIG_FILE)
    with open(config_file) as f:
        saved = json.load(f)
    assert saved["retro"]["model"]["encoder_embedding_skip"]  # the default
    assert saved["retro"]["model"]["attention_gate_logit_scale"] == 30.0
    saved["extra"] = {"retro": saved.pop("retro")}
    assert not saved["extra"]["retro"]["model"]["neighbor_embedding_grad"]  # the default
    for field in ("align_neighbors", "encoder_embedding_skip", "attention_gate_logit_scale", "attention_gate_init",
                  "neighbor_embedding_grad"):
        del saved["extra"]["retro"]["model"][field]
    with open(config_file, "w") as f:
        json.dump(saved, f)
    old = retro_checkpoint.config_from_checkpoint(path, str(workspace["work_dir"])).retro.model
    assert not old.align_neighbors and not old.encoder_embedding_skip and old.neighbor_embedding_grad
    assert old.attention_gate_logit_scale == 1.0 and old.attention_gate_init == 0.5


def test_evaluate_reports_the_gate_per_mode_and_per_overlap_bucket(workspace, tmp_path):
    """With --retro-attention-gate: gate_mean 0.0 with retrieval off, the model's mean over chunks
    with a real neighbour otherwise, and each overlap bucket's mean gate (chunk 1 of each sample
    is scored; it reads chunk 0's neighbours, so its gate is chunk 0's)."""
    from megatron.training import retro_checkpoint, retro_data
    from megatron.training.checkpointing import TrainState, save_checkpoint
    from megatron.training.trainer import sample_counts
    from tools.retro.evaluate import evaluate

    model, cfg = workdir_retro_and_config(workspace, gate=True)
    save_checkpoint(str(tmp_path / "ckpt"), TrainState(iteration=4), model, None, None, dataclasses.asdict(cfg))
    results = evaluate(str(tmp_path / "ckpt"), str(workspace["work_dir"]), eval_samples=4, overlap_buckets=True)
    assert results["retrieval_off"]["gate_mean"] == 0.0

    cfg = retro_checkpoint.config_from_checkpoint(str(tmp_path / "ckpt" / "iter_0000004"),
                                               str(workspace["work_dir"]))
    retro_data.prepare(cfg)
    _, valid, _ = retro_data.datasets(cfg, sample_counts(cfg), retrieval="on", training=False)
    items = [valid[i] for i in range(4)]
    batch = {key: torch.from_numpy(np.stack([item[key] for item in items])) for key in ("text", "neighbor_tokens",
                                                                                        "neighbor_mask")}
    means = []
    with torch.no_grad():
        for half in (slice(0, 2), slice(2, 4)):  # the run's micro-batches of 2: their means are averaged
            model(batch["text"][half, :-1], batch["neighbor_tokens"][half], batch["neighbor_mask"][half])
            means.append(model.gate_mean().item())
        model(batch["text"][:, :-1], batch["neighbor_tokens"], batch["neighbor_mask"])
    values, real = model.chunk_gates()
    assert real[:, 0].all() and len(set(values[:, 0].tolist())) > 1  # the gate differs between chunks
    assert results["retrieval_on"]["gate_mean"] == pytest.approx(sum(means) / 2, rel=1e-5)
    assert 0.0 < results["random_retrieval"]["gate_mean"] < 1.0
    buckets = results["overlap_buckets"].values()
    assert sum(b["gate_mean"] * b["chunks"] for b in buckets if b["chunks"]) == pytest.approx(
        values[:, 0].sum().item(), rel=1e-5)
    assert all(b["gate_mean"] is None for b in buckets if not b["chunks"])


def test_evaluate_ckpt_step_scores_that_iteration_not_the_latest(workspace, tmp_path):
    """evaluate.py --ckpt-step (learning curves): two saved iterations with other weights score apart."""
    from megatron.training.checkpointing import TrainState, save_checkpoint
    from tools.retro.evaluate import evaluate

    model, cfg = workdir_retro_and_config(workspace)
    save_checkpoint(str(tmp_path / "ckpt"), TrainState(iteration=2), model, None, None, dataclasses.asdict(cfg))
    with torch.no_grad():
        model.norm.weight.mul_(3.0)
    save_checkpoint(str(tmp_path / "ckpt"), TrainState(iteration=4), model, None, None, dataclasses.asdict(cfg))

    first = evaluate(str(tmp_path / "ckpt"), str(workspace["work_dir"]), eval_samples=2, ckpt_step=2)
    latest = evaluate(str(tmp_path / "ckpt"), str(workspace["work_dir"]), eval_samples=2)
    assert (first["step"], latest["step"]) == (2, 4)
    assert first["retrieval_off"]["lm_loss"] != pytest.approx(latest["retrieval_off"]["lm_loss"], rel=1e-3)


def test_grouped_query_attention_caches_its_key_value_heads_and_decodes_as_the_full_forward():
    torch.manual_seed(0)
    gpt = GPTModel(dataclasses.replace(tiny_retro().cfg, num_query_groups=1, add_qkv_bias=True))
    gpt.init_weights()
    gpt.eval()
    tokens = torch.randint(0, V, (1, 13), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(incremental_logits(gpt, tokens, [4] + [1] * 9), gpt(tokens), rtol=1e-5, atol=1e-5)
    decoder = IncrementalDecoder(gpt)
    decoder.step(tokens)
    assert decoder.caches["0"].keys.shape[2] == 1  # one copy of the shared head, not one per query head
