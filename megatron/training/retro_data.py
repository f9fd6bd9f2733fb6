"""A pretrain_retro.py run's data: the check that the retro work dir was built for this run, and
the datasets provider. Training reads everything about the data from the work dir (tools/retro/
preprocess_data.py): chunk length, neighbours per training/validation sample, the chunk DB. The
work dir's neighbour row i belongs to the GPT dataset's sample i only when both were built from
the same data, split, seq length, seed, tokenizer and sample counts, so a mismatch is refused,
naming the field."""

from megatron.data.blended_dataset import parse_data_path
from megatron.data.builder import build_gpt_datasets, check_token_ids
from megatron.data.retro_dataset import RetroDataset
from megatron.retrieval.chunk_db import ChunkDB
from megatron.retrieval.neighbors import load_neighbors
from megatron.retrieval.workdir import (
    check_dataset_fingerprints,
    check_workdir_matches,
    expected_for_training,
    load_workdir_config,
)
from megatron.training.config import Config
from megatron.training.tokenizer import build_run_tokenizer
from megatron.training.trainer import sample_counts


def prepare(cfg: Config) -> dict:
    """Builds the tokenizer, pads the vocabulary, and checks the work dir against this run.
    Returns the work dir's config."""
    d, retro = cfg.data, cfg.retro
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


def datasets(cfg: Config, num_samples, retrieval: str = "on", training: bool = True):
    """(train, valid, test) for this run: GPT samples, with neighbours when RETRO trains.
    `retrieval` applies to validation (evaluation ablations); training samples use the
    --retro-no/random-retrieval-prob mix, after --retro-retrieval-warmup-iters with none."""
    retro = cfg.retro
    train, valid, test = build_gpt_datasets(cfg.data, cfg.model.seq_length, num_samples, cfg.training.seed)
    if not retro.add_retriever:
        return train, valid, test
    db = ChunkDB(retro.work_dir)

    def wrap(ds, split, mode, no_p=0.0, random_p=0.0, warmup_samples=0):
        if ds is None:
            return None
        return RetroDataset(ds, load_neighbors(retro.work_dir, split), db, retro.model.num_neighbors,
                            retro.model.chunk_length, cfg.model.seq_length, retrieval=mode,
                            no_retrieval_prob=no_p, random_retrieval_prob=random_p,
                            seed=cfg.training.seed, name=split, align_neighbors=retro.model.align_neighbors,
                            warmup_samples=warmup_samples)

    warmup_samples = retro.retrieval_warmup_iters * cfg.training.global_batch_size
    train = wrap(train, "train", "on", retro.no_retrieval_prob, retro.random_retrieval_prob,
                 warmup_samples) if training else None
    return train, wrap(valid, "valid", retrieval), None

