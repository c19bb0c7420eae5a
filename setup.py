"""rlengine: a standalone reinforcement-learning engine for LLM reasoning."""
from setuptools import find_packages, setup

setup(
    name="rlengine",
    version="0.1.0",
    description="Readable, numerically tested RL for LLM reasoning: ZeRO-3 actor, vLLM/HF rollout, loss zoo",
    python_requires=">=3.11",
    packages=find_packages(include=["rlengine", "rlengine.*"]),
    package_data={"rlengine": ["data_files/*.jsonl"]},
    install_requires=[
        "torch==2.13.0",
        "deepspeed==0.19.8",
        "transformers>=5.16.1,<5.20",
        "gguf",
        "accelerate",
        "safetensors",
        "math-verify[antlr4-13-2]==0.9.0",
        "datasets",
        "pyarrow",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "pandas",
        "xxhash",
        "ninja",
    ],
    extras_require={
        "gpu": ["vllm==0.32.0", "flash-attn"],
        "dev": ["pytest", "pytest-timeout", "trl==1.16.0"],
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["rlengine=rlengine.__main__:main"]},
)
