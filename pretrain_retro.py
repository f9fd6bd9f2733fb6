"""Pretrain RETRO (or, without --retro-add-retriever, the same-size GPT on the same samples).

    python tools/retro/preprocess_data.py --retro-tasks build --retro-work-dir wd ...   # first
    python pretrain_retro.py --retro-add-retriever --retro-work-dir wd \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tok/ \
        --num-layers 4 --hidden-size 256 --num-attention-heads 4 --seq-length 256 \
        --micro-batch-size 8 --global-batch-size 32 --train-iters 300 --lr 1e-3 --save ckpt

The data (--data-path, chunk length, neighbours) comes from the work dir; its config must match
this run's seq length, tokenizer, split, seed and sample counts. RETRO-fitting:
--retro-fit-from GPT_SAVE_DIR loads that GPT checkpoint into the decoder, freezes it and trains
only the encoder, chunked cross-attention and gates (checkpoints still hold every parameter). Under torchrun the same command
runs data, tensor and sequence parallel (--tensor-model-parallel-size, --sequence-parallel, ...).
"""

import sys

from megatron.models.loss import next_token_loss
from megatron.parallel.parallelize import parallelize_fn
from megatron.training import retro_config, retro_data, retro_fit, retro_step
from megatron.training.arguments import parse_args
from megatron.training.trainer import pretrain


def main(argv=None) -> dict:
    try:
        cfg = parse_args(argv, extra_args_provider=retro_config.add_retro_args,
                         extra_config_provider=retro_config.retro_config_from_args)
        retro_data.prepare(cfg)
    except ValueError as e:  # a work dir that does not fit this run: say which field, no traceback
        raise SystemExit(f"error: {e}") from None
    return pretrain(cfg, retro_step.model_provider, retro_step.make_forward_step(cfg),
                    lambda c, counts: retro_data.datasets(c, counts), loss_fn=next_token_loss,
                    budget_loss_fn=retro_step.make_budget_loss_fn(cfg), flops_per_token=retro_step.flops_per_token(cfg),
                    parallelize_fn=parallelize_fn, post_init_fn=retro_fit.post_init)


if __name__ == "__main__":
    main(sys.argv[1:])
