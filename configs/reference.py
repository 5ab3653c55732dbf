"""The reference's model shapes with its training setup: blocks of 512 without padding, AdamW
lr 5e-5 (no warmup, linear decay, clip 1.0), 3 epochs, 4 examples per device, seed 42, head
spec 0,1,1,4, alpha 100, the reference's token stream (each training file read and tokenized
whole, blank lines and all, every block trained on; evaluation only on ``data.eval_files``) and
its MLM targets (<unk> and <mask> in the text are predicted). Its command line was
``--num_train_epochs 3 --per_device_train_batch_size=4``: the steps are counted from the epochs
once the corpus is read (the run prints them), and the global batch is 4 x the devices that
split the batch. docs/REPRODUCING.md maps each of its flags to ours.

The argument after ``:`` picks the shape:

* ``ag_config/`` and ``oromo_config/`` (RoBERTa, byte-level BPE of 52,000): roberta_4,
  roberta_8, roberta_12, roberta_16, roberta_self_24, roberta_self_48 (attention-only layers);
* ``filipino_config/`` (BERT, WordPiece of 30,101, 512 positions): bert_8, bert_16,
  bert_self_24 and bert_48 with full BERT layers, as the reference built them (its
  ``self_attention_*`` config.json files have model_type ``bert``, which builds full layers
  whatever their ``architectures`` say), and bert_attention_only_24, the attention-only model
  that ``self_attention_24``'s name meant.

    python -m guided_jax.main --config configs/reference.py:roberta_4 --workdir runs/roberta_4 \
        --config.data.train_files=train.txt --config.data.tokenizer_dir=TOKENIZER_DIR
    python -m guided_jax.main --config configs/reference.py:bert_8 --workdir runs/bert_8 \
        --config.data.train_files=tl_train.txt --config.guidance.heads="0,1,1,0,3,3" \
        --config.guidance.tokens="[SEP],."

Or give a reference directory (config.json + tokenizer files) instead of a shape:

    python -m guided_jax.main --config configs/reference.py --workdir runs/oromo_8 \
        --config.model.from_dir=ag_config/oromo_config/roberta_8 \
        --config.data.train_files=om_train.txt
"""

from guided_jax.config import base_config, model_config


def get_config(shape: str = "roberta_12"):
    config = base_config()
    config.model = model_config(shape)
    config.train.steps = 0  # counted from the epochs
    config.train.epochs = 3.0
    config.train.per_device_batch_size = 4
    config.data.mlm_targets = "reference"
    config.data.format = "reference_text"  # whole files, every block trained on
    if config.model.model_type == "bert":  # a WordPiece of the model's size, as BERT's
        config.data.tokenizer_kind = "wordpiece"
        config.data.tokenizer_vocab_size = config.model.vocab_size
    return config
