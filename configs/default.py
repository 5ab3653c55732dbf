"""The README's default job: a short guided pretraining run on CPU, offline.

A 4-layer RoBERTa (d=128, 8 heads, FFN 512) learns masked-LM on blocks of 64 tokens of the
embedded default corpus (the Python standard library's docstrings) with attention guidance on the
reference spec 0,1,1,4 (head 0 -> next token, head 1 -> previous token, heads 2-5 -> first
token), alpha = 100.

    python -m guided_jax.main --config configs/default.py --workdir runs/default

Baseline for comparison: add ``--config.guidance.enabled=false``.
"""

from guided_jax.config import base_config, model_config


def get_config():
    config = base_config()
    config.model = model_config(
        vocab_size=-1, hidden_size=128, num_layers=4, num_heads=8, intermediate_size=512
    )
    config.data.block_size = 64
    config.data.tokenizer_vocab_size = 4096
    config.train.steps = 400
    config.train.batch_size = 16
    config.train.learning_rate = 5e-4
    config.train.warmup_steps = 40
    config.train.log_every = 20
    config.train.eval_every = 100
    config.train.eval_batches = 8
    config.train.checkpoint_every = 200
    return config
