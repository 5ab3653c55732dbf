"""The reference's model shapes with its training setup: blocks of 512 without padding, AdamW
lr 5e-5 (no warmup, linear decay, clip 1.0), batch 4, seed 42, head spec 0,1,1,4, alpha 100.

The argument after ``:`` picks the shape: roberta_4, roberta_8, roberta_12, roberta_16,
roberta_self_24 or roberta_self_48 (attention-only layers).

    python -m guided_jax.main --config configs/reference.py:roberta_4 --workdir runs/roberta_4 \
        --config.data.train_files=train.txt --config.data.tokenizer_dir=TOKENIZER_DIR
"""

from guided_jax.config import base_config, model_config


def get_config(shape: str = "roberta_12"):
    config = base_config()
    config.model = model_config(shape)
    return config
