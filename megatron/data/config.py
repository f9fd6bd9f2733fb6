"""The data's section of the run's configuration (--data-path, --split, the tokenizer, ...):
beside the dataset builders that read it, which preprocessing (megatron/retrieval) and training
both call."""

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    data_path: list[str] = field(default_factory=list)
    split: str = "969,30,1"
    data_cache_path: str | None = None
    tokenizer_type: str | None = None
    tokenizer_model: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    num_workers: int = 0
