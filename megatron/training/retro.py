"""RETRO's part of training and evaluation: its flags, its config section, the work-dir check,
its datasets and its forward step. Shared by pretrain_retro.py and tools/retro/evaluate.py.

Training reads everything about the data from the retro work dir (tools/retro/preprocess_data.py):
chunk length, neighbours per training/validation sample, the chunk DB. The work dir's neighbour
row i belongs to the GPT dataset's sample i only when both were built from the same data, split,
seq length, seed, tokenizer and sample counts, so a mismatch is refused, naming the field.
"""

import argparse
import dataclasses
import os

import numpy as np
import torch

from megatron.data.blended_dataset import parse_data_path
from megatron.data.builder import SPLIT_NAMES, build_gpt_datasets, check_token_ids
from megatron.data.config import DataConfig
from megatron.data.retro_dataset import RetroDataset
from megatron.models.gpt.flops import gpt_flops_per_token
from megatron.models.gpt.model import GPTModel
from megatron.models.loss import LM_LOSS, lm_loss
from megatron.models.retro.config import RetroConfig
from megatron.models.retro.model import RetroModel, retro_flops_per_token
from megatron.parallel.ranks import rank_and_world_size
from megatron.retro.chunk_db import ChunkDB
from megatron.retro.workdir import (
    WorkDir,
    check_dataset_fingerprints,
    check_workdir_matches,
    expected_for_training,
    load_workdir_config,
)
from megatron.training.checkpointing import (
    check_model_config,
    dcp_load,
    find_checkpoint,
    read_checkpoint_config,
    read_metadata,
    saved_add_retriever,
)
from megatron.training.config import Config
from megatron.training.tokenizer import build_run_tokenizer
from megatron.training.trainer import sample_counts

BUDGET_LOSS = "budget loss"
GATE_MEAN = "gate mean"
# Below this retrieval-off minus retrieval-on lm loss a model is taken to ignore its neighbours
# (evaluate.py's --min-delta warning, the quickstart's verdict).
MIN_RETRIEVAL_GAIN = 0.01


@dataclasses.dataclass
class RetroTrainingConfig:
    """The `retro` section: the model part (RetroConfig) and what training does with retrieval."""
    add_retriever: bool = False
    work_dir: str | None = None
    model: RetroConfig = dataclasses.field(default_factory=RetroConfig)
    budget_loss_coeff: float = 0.0
    no_retrieval_prob: float = 0.0
    random_retrieval_prob: float = 0.0
    fit_from: str | None = None


def add_retro_args(parser):
    g = parser.add_argument_group("retro")
    g.add_argument("--retro-add-retriever", action="store_true",
                   help="train RETRO; without it the same-size GPT trains on the same samples")
    g.add_argument("--retro-work-dir", required=True, help="work dir built by tools/retro/preprocess_data.py")
    g.add_argument("--retro-num-neighbors", type=int, default=2, help="k neighbours per chunk (<= saved)")
    g.add_argument("--retro-decoder-layers", type=int, nargs="+", default=None,
                   help="1-based decoder layers with chunked cross-attention (default: Megatron-LM's, "
                        "every third from layer 6 (<= 15 layers) or 9; under 6 layers: every third back from the last)")
    g.add_argument("--retro-encoder-layers", type=int, default=2)
    g.add_argument("--retro-encoder-hidden-size", type=int, default=None)
    g.add_argument("--retro-encoder-attention-heads", type=int, default=None)
    g.add_argument("--retro-encoder-cross-attention", choices=["first", "all"], default="first",
                   help="encoder layers conditioned on the decoder chunk (paper and Megatron-LM: first)")
    g.add_argument("--retro-encoder-embedding-skip", action=argparse.BooleanOptionalAction,
                   default=RetroConfig.encoder_embedding_skip,
                   help="add each neighbour token's normalised embedding to the encoder output, so the "
                        "chunked cross-attention reads which token sits where (models/retro/encoder.py); "
                        "--no-retro-encoder-embedding-skip: the paper's encoder")
    g.add_argument("--retro-cca-gate-init", type=float, default=RetroConfig.cca_gate_init,
                   help="start of each retro layer's tanh(alpha) gate on its chunked cross-attention "
                        "output (alpha; 0 starts closed, as Flamingo, and stayed closed on real text: "
                        "docs/experiments.md)")
    g.add_argument("--retro-align-neighbors", action=argparse.BooleanOptionalAction,
                   default=RetroConfig.align_neighbors,
                   help="read each neighbour's 2m tokens from where the chunk it was retrieved for sits "
                        "in it, moved by up to m tokens (megatron/retro/align.py); --no-retro-align-neighbors "
                        "reads chunk + continuation from the DB's chunk boundary, as the paper")
    g.add_argument("--retro-attention-gate", action="store_true",
                   help="learned per-chunk gate on each chunked cross-attention output, from the chunk's "
                        "bigram overlap with its neighbours (models/retro/gate.py)")
    g.add_argument("--retro-attention-gate-logit-scale", type=float, default=RetroConfig.attention_gate_logit_scale,
                   help="the per-chunk gate's logits are this times their parameters, so that the "
                        "optimizer's ~lr steps move the gate across its range within a short run")
    g.add_argument("--retro-attention-gate-init", type=float, default=RetroConfig.attention_gate_init,
                   help="every chunk's per-chunk gate at the start, in (0, 1)")
    g.add_argument("--retro-budget-loss-coeff", type=float, default=0.0,
                   help="adds C x the mean gate over chunks with a real neighbour to the loss "
                        "(needs --retro-attention-gate)")
    g.add_argument("--retro-no-retrieval-prob", type=float, default=0.0,
                   help="per training sample, probability of dropping all neighbours")
    g.add_argument("--retro-random-retrieval-prob", type=float, default=0.0,
                   help="per training sample, probability of random DB chunks as neighbours")
    g.add_argument("--retro-fit-from", default=None,
                   help="RETRO-fitting: load this GPT checkpoint, freeze it, train encoder, CCA and gates")
    return parser


def retro_config_from_args(args) -> dict:
    if args.retro_budget_loss_coeff and not args.retro_attention_gate:
        raise SystemExit("error: --retro-budget-loss-coeff needs --retro-attention-gate")
    if args.retro_fit_from and not args.retro_add_retriever:
        raise SystemExit("error: --retro-fit-from needs --retro-add-retriever (it trains a RETRO around the GPT)")
    wd_cfg = load_workdir_config(args.retro_work_dir)
    model = RetroConfig(
        chunk_length=wd_cfg["chunk_length"], num_neighbors=args.retro_num_neighbors,
        decoder_layers=args.retro_decoder_layers, encoder_num_layers=args.retro_encoder_layers,
        encoder_hidden_size=args.retro_encoder_hidden_size,
        encoder_num_attention_heads=args.retro_encoder_attention_heads,
        encoder_cross_attention=args.retro_encoder_cross_attention,
        encoder_embedding_skip=args.retro_encoder_embedding_skip,
        cca_gate_init=args.retro_cca_gate_init,
        align_neighbors=args.retro_align_neighbors,
        attention_gate=args.retro_attention_gate,
        attention_gate_logit_scale=args.retro_attention_gate_logit_scale,
        attention_gate_init=args.retro_attention_gate_init)
    return {"retro": RetroTrainingConfig(
        add_retriever=args.retro_add_retriever, work_dir=os.path.abspath(args.retro_work_dir), model=model,
        budget_loss_coeff=args.retro_budget_loss_coeff, no_retrieval_prob=args.retro_no_retrieval_prob,
        random_retrieval_prob=args.retro_random_retrieval_prob, fit_from=args.retro_fit_from)}


def prepare(cfg: Config) -> dict:
    """Builds the tokenizer, pads the vocabulary, and checks the work dir against this run.
    Returns the work dir's config."""
    d, retro = cfg.data, cfg.extra["retro"]
    tokenizer = build_run_tokenizer(cfg)
    wd_cfg = load_workdir_config(retro.work_dir)
    if not d.data_path:
        d.data_path = [str(x) for entry in wd_cfg["data_path"] for x in entry]
    train, valid, _ = sample_counts(cfg)
    check_workdir_matches(wd_cfg, **expected_for_training(
        d, cfg.model.seq_length, cfg.training.seed, train, valid, tokenizer.fingerprint()))
    check_dataset_fingerprints(wd_cfg)
    check_token_ids([prefix for _, prefix in parse_data_path(d.data_path)] +
                    [entry["path"] for entry in wd_cfg["db_datasets"]],
                    tokenizer.vocab_size, d.tokenizer_model or d.vocab_file, d.data_cache_path)
    saved_k = wd_cfg["num_neighbors_save"]
    if retro.model.num_neighbors > saved_k:
        raise SystemExit(f"error: --retro-num-neighbors {retro.model.num_neighbors} exceeds the "
                         f"{saved_k} neighbours per chunk saved in {retro.work_dir}")
    return wd_cfg


def model_provider(cfg: Config):
    retro = cfg.extra["retro"]
    return RetroModel(cfg.model, retro.model) if retro.add_retriever else GPTModel(cfg.model)


def config_from_checkpoint(path: str, work_dir: str) -> Config:
    """The Config a pretrain_retro.py checkpoint directory was trained with (its config.json),
    pointed at `work_dir`."""
    saved = read_checkpoint_config(path)
    cfg = Config(**{f.name: _build(f.default_factory, saved[f.name])
                    for f in dataclasses.fields(Config) if f.name != "extra"})
    saved_retro = saved.get("extra", {}).get("retro")
    if saved_retro is None:
        raise ValueError(f"{path}: not a pretrain_retro.py checkpoint (its config has no retro section)")
    # Checkpoints from before aligned neighbours were trained on the DB's chunk boundaries, and
    # those from before the encoder's embedding skip have none; their gates read unscaled logits
    # that started half open.
    model = RetroConfig(**{"align_neighbors": False, "encoder_embedding_skip": False,
                           "attention_gate_logit_scale": 1.0, "attention_gate_init": 0.5,
                           **saved_retro.pop("model")})
    cfg.extra["retro"] = RetroTrainingConfig(**dict(saved_retro, model=model, work_dir=os.path.abspath(work_dir)))
    return cfg


def _build(factory, values: dict):
    default = factory()
    known = {f.name for f in dataclasses.fields(default)}
    return dataclasses.replace(default, **{k: v for k, v in values.items() if k in known})


def post_init(model: torch.nn.Module, cfg: Config):
    """The trainer's post_init_fn: RETRO-fitting (--retro-fit-from) loads the GPT checkpoint into
    the freshly initialised RetroModel's decoder and freezes it."""
    fit_from = cfg.extra["retro"].fit_from
    if fit_from:
        frozen = load_gpt_into_retro(fit_from, model, dataclasses.asdict(cfg.model))
        if rank_and_world_size()[0] == 0:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f" > RETRO-fitting: loaded and froze {frozen} GPT tensors from {fit_from}; training "
                  f"{trainable} encoder, CCA and gate parameters", flush=True)


def load_gpt_into_retro(root: str, model: torch.nn.Module, model_config: dict) -> int:
    """RETRO-fitting: copy the newest GPT checkpoint under `root` (a --save directory of this
    project) into the RetroModel's decoder and set requires_grad False on every parameter it
    held; the encoder, CCA, cca_norm and gates stay trainable. Returns the number of tensors.

    The decoder parameters of a RetroModel have the GPTModel's names, so the checkpoint's model
    entries map one to one; the architecture (model section of config.json) must be the same."""
    found = find_checkpoint(root)
    if found is None:
        raise ValueError(f"{root}: no complete checkpoint to RETRO-fit from (--retro-fit-from)")
    _, path = found
    saved = read_checkpoint_config(path)
    if saved_add_retriever(saved):
        raise ValueError(f"{path}: a RETRO checkpoint; --retro-fit-from takes a GPT one")
    check_model_config(saved.get("model", {}), model_config, path)
    saved_names = {key[len("model."):] for key in
                   read_metadata(path).state_dict_metadata if key.startswith("model.")}
    state = model.state_dict()
    missing = sorted(saved_names - set(state))
    if missing:
        raise ValueError(f"{path}: holds {missing[:3]}... which the RETRO model does not have")
    if not saved_names:
        raise ValueError(f"{path}: holds no model weights")
    payload = {"model": {name: state[name] for name in saved_names}}
    dcp_load(payload, path)
    with torch.no_grad():
        for name, tensor in payload["model"].items():
            if tensor.data_ptr() != state[name].data_ptr():  # DCP loads in place; copy if it did not
                state[name].copy_(tensor)
    for name, param in model.named_parameters():
        if name in saved_names:
            param.requires_grad_(False)
    return len(saved_names)


def flops_per_token(cfg: Config) -> float:
    retro = cfg.extra["retro"]
    if retro.add_retriever:
        return retro_flops_per_token(cfg.model, retro.model, cfg.model.seq_length)
    return gpt_flops_per_token(cfg.model)


def load_neighbors(work_dir: str, split: str) -> np.ndarray:
    path = WorkDir(work_dir).neighbors(split)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: not found; run tools/retro/preprocess_data.py --retro-tasks query-neighbors")
    try:
        neighbors = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:  # numpy's own message (e.g. a truncated file) names no file
        raise ValueError(f"{path}: damaged neighbour file ({e}); delete it and rerun "
                         f"tools/retro/preprocess_data.py --retro-tasks query-neighbors") from None
    if neighbors.dtype != np.int64 or neighbors.ndim != 3:
        raise ValueError(f"{path}: expected int64 [samples, chunks, k] neighbours, found {neighbors.dtype} "
                         f"{list(neighbors.shape)}; delete it and rerun --retro-tasks query-neighbors")
    return neighbors


def datasets(cfg: Config, num_samples, retrieval: str = "on", training: bool = True):
    """(train, valid, test) for this run: GPT samples, with neighbours when RETRO trains.
    `retrieval` applies to validation (evaluation ablations); training samples use the
    --retro-no/random-retrieval-prob mix."""
    retro = cfg.extra["retro"]
    train, valid, test = build_gpt_datasets(cfg.data, cfg.model.seq_length, num_samples, cfg.training.seed)
    if not retro.add_retriever:
        return train, valid, test
    db = ChunkDB(retro.work_dir)

    def wrap(ds, split, mode, no_p=0.0, random_p=0.0):
        if ds is None:
            return None
        return RetroDataset(ds, load_neighbors(retro.work_dir, split), db, retro.model.num_neighbors,
                            retro.model.chunk_length, cfg.model.seq_length, retrieval=mode,
                            no_retrieval_prob=no_p, random_retrieval_prob=random_p,
                            seed=cfg.training.seed, name=split, align_neighbors=retro.model.align_neighbors)

    train = wrap(train, "train", "on", retro.no_retrieval_prob, retro.random_retrieval_prob) if training else None
    return train, wrap(valid, "valid", retrieval), None


def workdir_dataset(work_dir: str, wd_cfg: dict, split: str, num_neighbors: int | None = None,
                    align_neighbors: bool = RetroConfig.align_neighbors,
                    data_cache_path: str | None = None) -> RetroDataset:
    """A split's samples with their neighbours, from the work dir's own record of the data (its
    config.json) rather than a run's Config, so that sample i is the one neighbour row i was
    queried for. num_neighbors None: every saved neighbour."""
    if not wd_cfg[f"{split}_samples"]:
        raise ValueError(f"--split {split}: the work dir has no {split} samples, hence no neighbours "
                         f"({split}_samples is 0 in {WorkDir(work_dir).config})")
    neighbors = load_neighbors(work_dir, split)
    data = DataConfig(data_path=[str(x) for entry in wd_cfg["data_path"] for x in entry], split=wd_cfg["split"],
                      data_cache_path=data_cache_path)
    # Only this split's samples: each split's sample order is independent of the others' counts.
    counts = tuple(wd_cfg[f"{name}_samples"] if name == split else 0 for name in SPLIT_NAMES)
    gpt = build_gpt_datasets(data, wd_cfg["seq_length"], counts, wd_cfg["seed"])[SPLIT_NAMES.index(split)]
    if gpt is None:
        raise ValueError(f"--split {split}: the work dir's --split {wd_cfg['split']} leaves no {split} documents")
    return RetroDataset(gpt, neighbors, ChunkDB(work_dir, wd_cfg), num_neighbors or neighbors.shape[2],
                        wd_cfg["chunk_length"], wd_cfg["seq_length"], name=split, align_neighbors=align_neighbors)


def make_forward_step(cfg: Config):
    retro = cfg.extra["retro"]
    coeff = retro.budget_loss_coeff

    def forward_step(model, batch: dict):
        text = batch["text"]
        tokens, labels = text[:, :-1], text[:, 1:]
        if not retro.add_retriever:
            loss = lm_loss(model(tokens), labels)
            return loss, {LM_LOSS: loss.detach()}
        logits = model(tokens, batch["neighbor_tokens"], batch["neighbor_mask"])
        loss = lm_loss(logits, labels)
        metrics = {LM_LOSS: loss.detach()}
        gate = _unwrap(model).gate_mean() if retro.model.attention_gate else None
        if gate is not None:
            metrics[GATE_MEAN] = gate.detach()
            if coeff:
                budget = coeff * gate
                metrics[BUDGET_LOSS] = budget.detach()
                loss = loss + budget
        return loss, metrics

    return forward_step


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DDP / compile wrappers (FSDP2 and TP keep the module itself)."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)
