#!/usr/bin/env bash
# Adaptive-RETRO-GPT-1B (the Hugging Face model card kyLELEng/adaptive-retro-gpt-1b), from raw
# parquet to the evaluation JSON, on one node of 8 GPUs:
#
#   FINEWEB_EDU=DIR WIKIPEDIA=DIR TOKENIZER_MODEL=DIR bash examples/retro/adaptive_retro_1b.sh
#   DRY_RUN=1 bash examples/retro/adaptive_retro_1b.sh      # print the commands, run nothing
#   sbatch examples/retro/adaptive_retro_1b.sbatch           # the same commands as a SLURM job
#
# Nothing is downloaded. The inputs are the parquet shards as published, e.g.
#   huggingface-cli download HuggingFaceFW/fineweb-edu --repo-type dataset --include 'sample/10BT/*' --local-dir data/fineweb-edu
#   huggingface-cli download wikimedia/wikipedia --repo-type dataset --include '20231101.en/*' --local-dir data/wikipedia
# and GPT-2's tokenizer.json (openai-community/gpt2) in TOKENIZER_MODEL.
#
# Steps; each is skipped when its output exists, and training resumes from its last
# checkpoint, so running the script again after an interruption continues where it stopped:
#   1. tools/preprocess_data.py         FineWeb-Edu sample-10BT -> the training dataset
#   2. tools/preprocess_data.py         Wikipedia 20231101.en -> the retrieval datastore
#   3. tools/retro/preprocess_data.py   the work dir: Wikipedia's chunk DB, its embeddings and
#                                       FAISS index, and the neighbours of every training chunk
#   4. pretrain_retro.py                the model, under torchrun
#   5. tools/retro/evaluate.py          retrieval on / off / random: the card's "Latest Metrics"
#
# From the card: the two datasets, sequence length 2048, retro layers 5, 11, 17, top-k 2, the
# learned adaptive gate with budget loss 0.001, no-retrieval and random-retrieval probability
# 0.1 each, 1,172,146,179 parameters, checkpoint step 20000. The card gives no width, depth,
# heads, tokenizer, encoder or schedule; those below are chosen, each with its reason. Its
# "retrieval sequence length 512" names no setting of this codebase and changes no parameter
# count: neighbours are read as the paper does, chunk + continuation, r = 2m = 128 tokens.
#
# Environment (relative paths are taken from the repository root):
#   FINEWEB_EDU, WIKIPEDIA   directories of the parquet shards (their *.parquet, read in name order)
#   TOKENIZER_MODEL          tokenizer.json or its directory
#   RUN                      where datasets, work dir, checkpoints and evaluation go
#   PYTHON                   the interpreter (default python)
#   NPROC, LAUNCH            processes, and the launcher of steps 3-5 (default
#                            "torchrun --standalone --nproc-per-node $NPROC")
#   WORKERS                  tokenizer processes of steps 1-2
#   DRY_RUN=1                print each command on one line (shell-quoted) instead of running it
# and, to run the same recipe at another scale (the defaults are the card's run): NUM_LAYERS,
# HIDDEN_SIZE, NUM_HEADS, ENCODER_HIDDEN_SIZE, ENCODER_HEADS, RETRO_LAYERS, SEQ_LENGTH,
# TRAIN_ITERS, GLOBAL_BATCH_SIZE, MICRO_BATCH_SIZE, LR_WARMUP_ITERS, EVAL_INTERVAL, EVAL_ITERS,
# SAVE_INTERVAL, INDEX_STR, INDEX_NTRAIN, NPROBE, EF_SEARCH, BF16 (1 or 0).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

FINEWEB_EDU=${FINEWEB_EDU:-data/fineweb-edu/sample/10BT}
WIKIPEDIA=${WIKIPEDIA:-data/wikipedia/20231101.en}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-data/tokenizers/gpt2}
RUN=${RUN:-runs/adaptive_retro_1b}
PYTHON=${PYTHON:-python}
NPROC=${NPROC:-8}
LAUNCH=${LAUNCH:-torchrun --standalone --nproc-per-node $NPROC}
WORKERS=${WORKERS:-32}
DRY_RUN=${DRY_RUN:-0}

# Model. 20 layers x 2048, 16 heads of 128, SwiGLU (FFN 5504), RMSNorm, RoPE, GPT-2's 50,257
# tokens padded to 50,304 with tied embeddings, and a 2-layer encoder of width 768 (12 heads of
# 64): 1,169,650,953 parameters, 0.2% under the card's count. The card's retro layers need at
# least 17 decoder layers; at width 2048 only 20 lands within 1% (19: -4.5%, 21: +4.1%,
# 24: +17%). The encoder reads k * r = 256 neighbour tokens per 64-token chunk, four times the
# decoder's tokens, so it is kept narrow: encoder and chunked cross-attention add 11% to the
# GPT's FLOPs per token at width 768, 45% at the decoder's 2048 (which would also put the
# count 9% over the card's). GPT-2's tokenizer because sample-10BT is counted in its tokens.
NUM_LAYERS=${NUM_LAYERS:-20}
HIDDEN_SIZE=${HIDDEN_SIZE:-2048}
NUM_HEADS=${NUM_HEADS:-16}
ENCODER_HIDDEN_SIZE=${ENCODER_HIDDEN_SIZE:-768}
ENCODER_HEADS=${ENCODER_HEADS:-12}
RETRO_LAYERS=${RETRO_LAYERS:-5 11 17}  # the card's
SEQ_LENGTH=${SEQ_LENGTH:-2048}         # the card's
CHUNK_LENGTH=64                        # m, the paper's
NUM_NEIGHBORS=2                        # k, the card's top-k

# Schedule: the card's checkpoint step, 20,000, as the length of the run; batches of 256 x 2048
# tokens so that it reads 10.5B tokens, one pass over sample-10BT (about 10B GPT-2 tokens). Validation: 10 batches every 2,000 steps (2,560
# sequences, 5.2M tokens), 1% of the documents held out (about 100M tokens, more than the
# 58M the 11 evaluations read). 8.53 GFLOP per token (retro_flops_per_token; the GPT of the
# same decoder 7.70): 9e19 FLOPs, about 8 hours on 8 H100s at 40% MFU (an estimate).
TRAIN_ITERS=${TRAIN_ITERS:-20000}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-256}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-4}
LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-1000}
EVAL_INTERVAL=${EVAL_INTERVAL:-2000}
EVAL_ITERS=${EVAL_ITERS:-10}
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
SPLIT=99,1,0
SEED=1234

# Index, for Wikipedia 20231101.en as the datastore: 6.4M articles, roughly 4-6B GPT-2 tokens,
# so 70-100M chunks of 64 (an estimate; step 3 prints the count). For 10M-100M vectors faiss's
# guidelines give IVF with 2^18 lists found through HNSW, trained on 30-256 points per list;
# 64-byte product codes after a rotation to 256 dims (OPQ) keep the inverted lists at 5-7 GB
# (codes + ids) instead of 100-150 GB of float32 384-wide embeddings. ntrain: 40 per list,
# 10.5M embeddings (16 GB of RAM while training). nprobe 128 of 262,144 lists scans about
# 35K codes per query, twice the tool's default for more recall at a cost still small beside
# the embedding (recall not measured here); the HNSW quantizer searches with efSearch 256, so
# that it finds those 128 lists. The query covers every chunk
# of every training sample: 5.1M samples x 32 chunks = 164M queries. 20 candidates leave room
# for DB chunks without text and for the documents a sample's own chunk comes from (only
# filtered when the datastore is the training data); 2 saved, the k the model reads.
INDEX_STR=${INDEX_STR:-OPQ64_256,IVF262144_HNSW32,PQ64}
INDEX_NTRAIN=${INDEX_NTRAIN:-10485760}
NPROBE=${NPROBE:-128}
EF_SEARCH=${EF_SEARCH:-256}

# Layout: pure FSDP over the 8 GPUs (--use-distributed-optimizer: dp_shard 8, tp 1). The whole
# training state, fp32 weights, gradients and Adam moments at 16 bytes per parameter, is 19 GB:
# it fits a GPU, so tensor parallelism would only split 2048-wide matmuls that are already
# small and put two collectives per layer on the critical path. Sharded 8 ways it is 2.3 GB a
# GPU, and FSDP's all-gathers overlap the compute. Micro-batch 4 with selective recompute
# leaves room for the encoder's neighbour activations (not measured here: raise it if memory
# allows); 256 / (8 x 4) = 8 accumulation steps.
BF16=${BF16:-1}

DATA=$RUN/data
WORK_DIR=$RUN/retro_workdir
SAVE=$RUN/checkpoints/retro
read -r -a launch <<< "$LAUNCH"
read -r -a retro_layers <<< "$RETRO_LAYERS"
precision=()
if [[ $BF16 == 1 ]]; then
    precision=(--bf16)
fi

# run CMD...: runs it, or with DRY_RUN=1 prints it on one line, shell-quoted.
run() {
    if [[ $DRY_RUN == 1 ]]; then
        printf '%q ' "$@"
        printf '\n'
    else
        echo "[adaptive_retro_1b] \$ $*" >&2
        "$@"
    fi
}

# step DONE CMD...: run CMD unless DONE exists (a finished step of an earlier run).
step() {
    local done=$1
    shift
    if [[ $DRY_RUN != 1 && -e $done ]]; then
        echo "[adaptive_retro_1b] skip (done: $done)" >&2
        return
    fi
    run "$@"
}

tokenizer=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL")
# The work dir records these, and training refuses one built with other values.
data_and_samples=(
    --data-path "$DATA/fineweb_edu_text_document"
    --split "$SPLIT"
    --seq-length "$SEQ_LENGTH"
    --seed "$SEED"
    "${tokenizer[@]}"
    --train-iters "$TRAIN_ITERS"
    --global-batch-size "$GLOBAL_BATCH_SIZE"
    --eval-interval "$EVAL_INTERVAL"
    --eval-iters "$EVAL_ITERS"
)

# 1-2. Parquet -> indexed datasets: the glob is quoted so the tool expands it, in name order.
step "$DATA/fineweb_edu_text_document.idx" \
    "$PYTHON" tools/preprocess_data.py --input "$FINEWEB_EDU/*.parquet" --json-keys text \
    --output-prefix "$DATA/fineweb_edu" "${tokenizer[@]}" --append-eod --workers "$WORKERS"
step "$DATA/wikipedia_text_document.idx" \
    "$PYTHON" tools/preprocess_data.py --input "$WIKIPEDIA/*.parquet" --json-keys text \
    --output-prefix "$DATA/wikipedia" "${tokenizer[@]}" --append-eod --workers "$WORKERS"

# 3. The work dir: embedding and query blocks split across the ranks, the index trained on
# rank 0 (on the GPUs with faiss-gpu).
step "$WORK_DIR/verify.json" \
    "${launch[@]}" tools/retro/preprocess_data.py --retro-tasks build --retro-work-dir "$WORK_DIR" \
    --retro-db-data-path "$DATA/wikipedia_text_document" "${data_and_samples[@]}" \
    --retro-gpt-chunk-length "$CHUNK_LENGTH" \
    --retro-index-str "$INDEX_STR" --retro-index-ntrain "$INDEX_NTRAIN" \
    --retro-query-nprobe "$NPROBE" --retro-query-ef-search "$EF_SEARCH" \
    --retro-query-num-neighbors-query 20 --retro-query-num-neighbors-save "$NUM_NEIGHBORS"

# 4. Training (resumes from the last checkpoint in $SAVE).
run "${launch[@]}" pretrain_retro.py "${data_and_samples[@]}" \
    --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN_SIZE" --num-attention-heads "$NUM_HEADS" \
    --swiglu --normalization RMSNorm --num-workers 2 \
    --retro-add-retriever --retro-work-dir "$WORK_DIR" --retro-num-neighbors "$NUM_NEIGHBORS" \
    --retro-decoder-layers "${retro_layers[@]}" --retro-encoder-layers 2 \
    --retro-encoder-hidden-size "$ENCODER_HIDDEN_SIZE" --retro-encoder-attention-heads "$ENCODER_HEADS" \
    --retro-attention-gate --retro-budget-loss-coeff 0.001 \
    --retro-no-retrieval-prob 0.1 --retro-random-retrieval-prob 0.1 \
    --micro-batch-size "$MICRO_BATCH_SIZE" --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine \
    --lr-warmup-iters "$LR_WARMUP_ITERS" --weight-decay 0.1 --clip-grad 1.0 \
    "${precision[@]}" --recompute-activations --use-distributed-optimizer \
    --log-interval 10 --save "$SAVE" --load "$SAVE" --save-interval "$SAVE_INTERVAL" --ckpt-keep-last 3 \
    --tensorboard-dir "$SAVE/tensorboard"

# 5. Evaluation of the last checkpoint, in the card's JSON shape.
eval_json=$RUN/evals/iter_$(printf '%07d' "$TRAIN_ITERS").json
step "$eval_json" \
    "${launch[@]}" tools/retro/evaluate.py --retro-work-dir "$WORK_DIR" --load "$SAVE" \
    --ckpt-step "$TRAIN_ITERS" --output "$eval_json"
