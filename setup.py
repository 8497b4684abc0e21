"""solo: an open training stack for SOLO-style monolithic vision-language models."""

from setuptools import find_packages, setup

setup(
    name="solo",
    version="0.1.0",
    description="Training stack for single-transformer vision-language models (SOLO style)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(
        include=["solo", "solo.*", "megatron_patch", "megatron_patch.*", "data_prep", "data_prep.*"]),
    package_data={"megatron_patch": ["recipes/*.yaml"], "solo.sft": ["recipes/*.yaml"]},
    install_requires=[
        # torch is a range on purpose: GPU users bring their own CUDA build; CPU machines
        # install torch==2.13.0 first (see README).
        "torch>=2.4,<2.15",
        # Pinned exactly: the CPU redirects in megatron_patch/compat.py touch private names.
        "megatron-core==0.16.1",
        "transformers>=5.0,<6",
        "accelerate>=1.0",
        "deepspeed>=0.16",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "pillow>=10.0",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "zstandard>=0.22",
        "lz4>=4.0",
        "pyarrow>=14",  # parquet caption/interleaved sources in solo-data
    ],
    extras_require={
        # megatron-core 0.16.1 supports Transformer Engine >=2.9,<2.12, and those TE releases refuse
        # flash-attn newer than 2.8.3 (2.8.3.post* included): on A100, where TE's cuDNN backend has
        # no packed-THD attention, a newer flash-attn leaves no attention backend at all.
        # megatron_patch/preflight.py checks the same at start-up.
        "gpu": ["transformer-engine[pytorch]>=2.9,<2.12", "flash-attn==2.8.3"],
        "test": ["pytest>=7", "pytest-xdist>=3", "ruff>=0.6"],  # xdist: the README's `-n 2`; ruff: the lint (ruff.toml)
        # lmms-eval model adapter (solo/eval/lmms_adapter.py). Its torchvision must match torch:
        # on a CPU machine with torch 2.13.0 install torchvision 0.28.* with it (see docs/evaluation.md).
        "lmms": ["lmms-eval==0.7.3"],
    },
    entry_points={
        "console_scripts": [
            "solo=solo.cli:main",
            "solo-data=data_prep.cli:main",
        ],
        "lmms_eval.models": ["solo=solo.eval.lmms_adapter:lmms_eval_manifest"],
    },
)
