"""The run's configuration: one dataclass per component, parsed once from the command line.

Each component is handed only its own section (TorchTitan's lesson: a monolithic config passed
everywhere couples everything to everything). The sections of lower layers live beside them
(ModelConfig: megatron/transformer/config.py, DataConfig: megatron/data/config.py,
ParallelConfig: megatron/parallel/config.py) and RETRO's beside RETRO's training
(RetroTrainingConfig: retro_config.py); this module holds training's own sections and `Config`,
their composition.
"""

from dataclasses import dataclass, field

from megatron.data.config import DataConfig
from megatron.parallel.config import ParallelConfig
from megatron.training.retro_config import RetroTrainingConfig
from megatron.transformer.config import ModelConfig


@dataclass
class TrainingConfig:
    micro_batch_size: int = 4
    global_batch_size: int | None = None  # None: micro batch x data-parallel size
    train_iters: int = 100
    lr: float = 3e-4
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"  # constant | linear | cosine
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None  # None: train_iters
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    bf16: bool = False
    seed: int = 1234
    eval_interval: int = 100
    eval_iters: int = 10
    exit_interval: int | None = None
    use_torch_compile: bool = False
    recompute_granularity: str | None = None  # None | "full" | "selective"
    keep_freed_host_memory: bool = True  # on a CPU: glibc keeps freed blocks for the next step (host_memory.py)


@dataclass
class LoggingConfig:
    log_interval: int = 10
    tensorboard_dir: str | None = None
    # Weights & Biases beside TensorBoard (logging.WandbWriter): on when wandb_project is set.
    wandb_project: str | None = None
    wandb_exp_name: str | None = None  # the run's name; required with wandb_project, as in Megatron
    wandb_save_dir: str | None = None  # None: <save>/wandb, else wandb's default ($WANDB_DIR or ./wandb)
    peak_tflops: float | None = None  # None: a known GPU's nominal peak, else the best measured (flops.mfu_peak)


@dataclass
class CheckpointConfig:
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    keep_last_n: int | None = None  # None: keep every checkpoint
    ckpt_step: int | None = None  # load this iteration instead of the latest one
    no_load_optim: bool = False
    no_load_rng: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # Filled by the entry point that trains RETRO (pretrain_retro.py's extra_config_provider);
    # None in runs without it (pretrain_gpt.py).
    retro: RetroTrainingConfig | None = None
