"""Generate text with a pretrain_retro.py checkpoint, retrieving live from a work dir.

    python tools/retro/text_generation.py --load ckpt/retro --retro-work-dir wd "def parse(" \\
        --max-new-tokens 128 --top-p 0.9 --temperature 0.8 --show-neighbors
    python tools/retro/text_generation.py --load ckpt/retro --retro-work-dir wd --prompt-file p.txt
    echo "import os" | python tools/retro/text_generation.py --load ckpt/retro --retro-work-dir wd

Every time the text (prompt or generated) completes a chunk of the model's chunk length, that
chunk is embedded with the work dir's frozen BERT, its k neighbours (with continuations) are
fetched through the work dir's index and chunk DB, and the tokens of the next chunk attend to
them. --retrieval off generates with no neighbours, random with random DB chunks, for side by
side samples; --show-neighbors prints what each chunk retrieved. Self-attention uses a KV cache,
so each new token costs one step. Output: the prompt and the generated text on stdout.
"""

import argparse
import sys

import torch

from megatron.inference.generation import SamplingConfig, generate
from megatron.inference.retrieval import RETRIEVAL_MODES, LiveRetriever
from megatron.training.retro_checkpoint import load_for_generation


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (else --prompt-file, else stdin)")
    p.add_argument("--prompt-file", default=None)
    p.add_argument("--load", required=True, help="checkpoint directory written by pretrain_retro.py --save")
    p.add_argument("--retro-work-dir", required=True, help="work dir to retrieve from (the model's tokenizer)")
    p.add_argument("--retrieval", choices=RETRIEVAL_MODES, default="on")
    p.add_argument("--num-neighbors", type=int, default=None, help="k per chunk (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--greedy", action="store_true", help="argmax decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234, help="sampling and random-retrieval seed")
    p.add_argument("--no-stop-at-eod", action="store_true", help="keep generating past <|endoftext|>")
    p.add_argument("--show-neighbors", action="store_true", help="print the neighbours retrieved per chunk")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    return args


def read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{args.prompt_file}: cannot read the prompt: {e}") from e
    return sys.stdin.read()


def show_neighbors(output, tokenizer, eod: int):
    def text(tokens):
        return tokenizer.detokenize([t for t in tokens if t != eod])

    for r in output.retrievals:
        print(f"--- chunk {r.chunk} ({'prompt' if (r.chunk + 1) * len(r.chunk_tokens) <= output.num_prompt_tokens else 'generated'}):"
              f" {text(r.chunk_tokens)!r}")
        for j, (cid, tokens, real) in enumerate(zip(r.neighbor_ids, r.neighbor_tokens, r.neighbor_mask)):
            print(f"    neighbour {j} (chunk {int(cid)}): {text(tokens) if real else '<none>'!r}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        prompt = read_prompt(args)
        model, tokenizer, cfg = load_for_generation(args.load, args.retro_work_dir, args.device)
        retro = cfg.retro
        prompt_tokens = tokenizer.tokenize(prompt)
        if not prompt_tokens:
            raise ValueError("the prompt is empty")
        retriever = None
        if retro.add_retriever and args.retrieval != "off":
            retriever = LiveRetriever(args.retro_work_dir, tokenizer, args.num_neighbors or retro.model.num_neighbors,
                                      mode=args.retrieval, seed=args.seed, device=args.device,
                                      align_neighbors=retro.model.align_neighbors)
            if args.num_neighbors:
                model.retro_cfg.verify_neighbor_count = False
        sampling = SamplingConfig(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p)
        generator = torch.Generator().manual_seed(args.seed)
        output = generate(model, prompt_tokens, args.max_new_tokens, retriever, sampling,
                          eod=None if args.no_stop_at_eod else tokenizer.eod, vocab_size=tokenizer.vocab_size,
                          generator=generator)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.show_neighbors:
        show_neighbors(output, tokenizer, tokenizer.eod)
        print("--- text:")
    print(prompt + tokenizer.detokenize([t for t in output.generated if t != tokenizer.eod]))
    print(f"[{len(output.generated)} tokens in {output.seconds:.2f} s, retrieval {output.retrieval_seconds:.2f} s, "
          f"{len(output.retrievals)} chunks retrieved, retrieval {args.retrieval if retriever else 'off'}]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
