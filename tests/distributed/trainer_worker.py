"""One rank of the trainer-integration test: megatron.training.trainer.pretrain on a synthetic
token dataset with megatron.parallel's parallelize_fn, the trainer's own optimizer, loss,
gradient accumulation and DCP checkpoints.

Run as ``python tests/distributed/trainer_worker.py SPEC.json OUT.json`` (by launcher.py, or
with no distributed environment for the single-process run). SPEC:
    {"parallel": ParallelConfig kwargs, "recompute", "train_iters", "save", "load", "save_interval", "ckpt_step"}
OUT (written by rank 0): {"losses": [lm loss of every iteration], "validation_loss", "consumed": samples,
"logit_types": the types of logits forward_step saw (DTensor under tensor parallelism: the
vocabulary-sharded logits were never gathered)}
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from megatron.models.gpt.model import GPTModel
from megatron.models.loss import LM_LOSS, next_token_loss
from megatron.parallel.config import ParallelConfig
from megatron.parallel.parallelize import parallelize_fn
from megatron.training.config import CheckpointConfig, Config, LoggingConfig, TrainingConfig
from megatron.training.trainer import pretrain
from megatron.transformer.config import ModelConfig

SEQ, VOCAB = 32, 128


class SyntheticTokens:
    """Deterministic samples: the same i gives the same tokens in every process."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        return {"text": np.random.default_rng(i).integers(0, VOCAB, SEQ + 1, dtype=np.int64)}


LOGIT_TYPES = set()


def forward_step(model, batch):
    logits = model(batch["text"][:, :-1])
    LOGIT_TYPES.add(f"{type(logits).__name__}{list(logits.placements) if isinstance(logits, DTensor) else ''}")
    return next_token_loss(logits, batch)


def config(spec: dict) -> Config:
    return Config(
        model=ModelConfig(vocab_size=VOCAB, num_layers=2, hidden_size=32, num_attention_heads=4,
                          ffn_hidden_size=64, seq_length=SEQ),
        # micro batch 1 with global batch 4: gradient accumulation over 4 / dp micro-batches.
        training=TrainingConfig(micro_batch_size=1, global_batch_size=4, train_iters=spec.get("train_iters", 5),
                                lr=1e-2, lr_decay_style="constant", eval_iters=1, eval_interval=1000, seed=7,
                                recompute_granularity=spec.get("recompute")),
        logging=LoggingConfig(log_interval=1, peak_tflops=1.0),
        checkpoint=CheckpointConfig(save=spec.get("save"), load=spec.get("load"),
                                    save_interval=spec.get("save_interval"), ckpt_step=spec.get("ckpt_step")),
        parallel=ParallelConfig(**spec.get("parallel", {})),
    )


def run(spec: dict) -> dict:
    cfg = config(spec)
    summary = pretrain(cfg, lambda c: GPTModel(c.model), forward_step,
                       lambda c, counts: (SyntheticTokens(counts[0]), SyntheticTokens(counts[1]), None),
                       loss_fn=next_token_loss, parallelize_fn=parallelize_fn)
    return {"losses": [m[LM_LOSS] for _, m in summary["train_history"]],
            "validation_loss": summary["validation_loss"], "consumed": summary["consumed_train_samples"],
            "logit_types": sorted(LOGIT_TYPES)}


def main():
    spec_path, out_path = sys.argv[1], sys.argv[2]
    result = run(json.loads(Path(spec_path).read_text()))
    if not dist.is_initialized() or dist.get_rank() == 0:
        tmp = out_path + ".tmp"
        Path(tmp).write_text(json.dumps(result))
        os.replace(tmp, out_path)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
