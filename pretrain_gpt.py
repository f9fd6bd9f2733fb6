"""Pretrain a GPT, Megatron-LM style.

    python pretrain_gpt.py --data-path data/corpus_text_document \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tok/ \
        --num-layers 4 --hidden-size 256 --num-attention-heads 4 --seq-length 256 \
        --micro-batch-size 8 --global-batch-size 32 --train-iters 500 --lr 3e-4 \
        --save ckpt --load ckpt --save-interval 100

and the same under `torchrun --nproc-per-node N pretrain_gpt.py ...` with Megatron's parallel flags
(--tensor-model-parallel-size, --sequence-parallel, --use-distributed-optimizer, ...), applied
by megatron.parallel from outside the model.
"""

import sys

from megatron.data.blended_dataset import parse_data_path
from megatron.data.builder import build_gpt_datasets, check_token_ids
from megatron.models.gpt.flops import gpt_flops_per_token
from megatron.models.gpt.model import GPTModel
from megatron.models.loss import next_token_loss
from megatron.parallel.parallelize import parallelize_fn
from megatron.training.arguments import parse_args
from megatron.training.config import Config
from megatron.training.tokenizer import build_run_tokenizer
from megatron.training.trainer import pretrain


def model_provider(cfg: Config) -> GPTModel:
    return GPTModel(cfg.model)


def forward_step(model, batch: dict):
    return next_token_loss(model(batch["text"][:, :-1]), batch)


def datasets_provider(cfg: Config, num_samples: tuple[int, int, int]):
    return build_gpt_datasets(cfg.data, cfg.model.seq_length, num_samples, cfg.training.seed)


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    if not cfg.data.data_path:
        raise SystemExit("error: --data-path is required")
    tokenizer = build_run_tokenizer(cfg)
    check_token_ids([prefix for _, prefix in parse_data_path(cfg.data.data_path)], tokenizer.vocab_size,
                    cfg.data.tokenizer_model or cfg.data.vocab_file, cfg.data.data_cache_path)
    return pretrain(cfg, model_provider, forward_step, datasets_provider, loss_fn=next_token_loss,
                    flops_per_token=gpt_flops_per_token(cfg.model), parallelize_fn=parallelize_fn)


if __name__ == "__main__":
    main(sys.argv[1:])
