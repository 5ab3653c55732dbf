"""A seconds-long run for tests and smoke checks (2 layers, d=32, 4 heads, blocks of 32).

    python -m guided_jax.main --config configs/tiny.py --workdir /tmp/tiny \
        --config.data.train_files=my_corpus.txt
"""

from guided_jax.config import base_config, model_config


def get_config():
    config = base_config()
    config.model = model_config(
        vocab_size=-1,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        max_position_embeddings=66,
    )
    config.data.block_size = 32
    config.data.tokenizer_vocab_size = 400
    config.data.eval_fraction = 0.1
    config.train.steps = 6
    config.train.batch_size = 4
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 1
    config.train.log_every = 2
    config.train.eval_every = 3
    config.train.eval_batches = 2
    config.train.checkpoint_every = 3
    config.guidance.heads = "0,1,1,1"
    return config
