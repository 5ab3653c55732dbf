"""Shapes for ``python -m guided_jax.benchmark`` (the speed comparison against HF Flax).

    python -m guided_jax.benchmark --config configs/benchmark.py               # CPU
    python -m guided_jax.benchmark --config configs/benchmark.py:roberta_12    # GPU / TPU
    python -m guided_jax.benchmark --config configs/benchmark.py:tiny          # seconds, tests

The default is the CPU target: 4 layers, d=256, 8 heads, FFN 1024, vocab 8000, blocks of 128,
batch 16. ``roberta_12`` is the reference's 12-layer base model on blocks of 512 in bfloat16.
Our arms use the default dense attention, the fastest at these lengths (measured on the 2-core
CPU and an H100, benchmarks/RESULTS.md); ``--config.model.attention=flash`` times the blockwise
kernel (same results, O(n) memory: the choice for long blocks), ``pallas`` the GPU/TPU kernels.
"""

from guided_jax.config import base_config, model_config


def get_config(shape: str = "cpu"):
    config = base_config()
    config.data.eval_fraction = 0.02
    config.train.steps = 1000  # sets the schedule only; the benchmark runs a few steps
    config.train.learning_rate = 1e-4
    config.train.warmup_steps = 10
    if shape == "cpu":
        config.model = model_config(
            vocab_size=8000,
            hidden_size=256,
            num_layers=4,
            num_heads=8,
            intermediate_size=1024,
        )
        config.data.block_size = 128
        config.data.tokenizer_vocab_size = 8000
        config.train.batch_size = 16
    elif shape == "roberta_12":
        config.model = model_config("roberta_12", vocab_size=32000, dtype="bfloat16")
        config.data.block_size = 512
        config.data.tokenizer_vocab_size = 32000
        config.train.batch_size = 32
    elif shape == "tiny":
        config.model = model_config(
            vocab_size=-1,
            hidden_size=32,
            num_layers=2,
            num_heads=8,
            intermediate_size=64,
            max_position_embeddings=66,
        )
        config.data.block_size = 32
        config.data.tokenizer_vocab_size = 400
        config.train.batch_size = 4
    else:
        raise ValueError(f"unknown benchmark shape {shape!r}; expected cpu, roberta_12 or tiny")
    return config
