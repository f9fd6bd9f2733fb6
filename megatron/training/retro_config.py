"""RETRO's section of the run's configuration and the flags that fill it (pretrain_retro.py,
tools/retro/evaluate.py): `add_retro_args` adds the flag group, `retro_config_from_args` turns the
parsed flags into a `RetroTrainingConfig`, the run's Config.retro."""

import argparse
import dataclasses
import os

from megatron.models.retro.config import RetroConfig
from megatron.retrieval.workdir import load_workdir_config


@dataclasses.dataclass
class RetroTrainingConfig:
    """The `retro` section: the model part (RetroConfig) and what training does with retrieval."""
    add_retriever: bool = False
    work_dir: str | None = None
    model: RetroConfig = dataclasses.field(default_factory=RetroConfig)
    budget_loss_coeff: float = 0.0
    no_retrieval_prob: float = 0.0
    random_retrieval_prob: float = 0.0
    retrieval_warmup_iters: int = 0
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
    g.add_argument("--retro-neighbor-embedding-grad", action=argparse.BooleanOptionalAction,
                   default=RetroConfig.neighbor_embedding_grad,
                   help="let the retrieval path train the token embedding it reads the neighbours with, as the "
                        "paper; off by default (detached): with it RETRO trained above its GPT early where the "
                        "neighbours hold little, and it read real ones no better (models/retro/config.py)")
    g.add_argument("--retro-align-neighbors", action=argparse.BooleanOptionalAction,
                   default=RetroConfig.align_neighbors,
                   help="read each neighbour's 2m tokens from where the chunk it was retrieved for sits "
                        "in it, moved by up to m tokens (megatron/retrieval/align.py); --no-retro-align-neighbors "
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
    g.add_argument("--retro-retrieval-warmup-iters", type=int, default=0,
                   help="mask every neighbour for this many training iterations at the start, so the "
                        "chunked cross-attention cannot slow the decoder while it forms (the quickstart "
                        "uses 100; docs/experiments.md)")
    g.add_argument("--retro-fit-from", default=None,
                   help="RETRO-fitting: load this GPT checkpoint, freeze it, train encoder, CCA and gates")
    return parser


def retro_config_from_args(args) -> dict:
    """{"retro": RetroTrainingConfig} (Config's section by name) from the parsed flags; the chunk
    length is the work dir's."""
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
        neighbor_embedding_grad=args.retro_neighbor_embedding_grad,
        align_neighbors=args.retro_align_neighbors,
        attention_gate=args.retro_attention_gate,
        attention_gate_logit_scale=args.retro_attention_gate_logit_scale,
        attention_gate_init=args.retro_attention_gate_init)
    return {"retro": RetroTrainingConfig(
        add_retriever=args.retro_add_retriever, work_dir=os.path.abspath(args.retro_work_dir), model=model,
        budget_loss_coeff=args.retro_budget_loss_coeff, no_retrieval_prob=args.retro_no_retrieval_prob,
        random_retrieval_prob=args.retro_random_retrieval_prob,
        retrieval_warmup_iters=args.retro_retrieval_warmup_iters, fit_from=args.retro_fit_from)}
