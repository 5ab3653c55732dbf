"""Fine-tuning a pretrained encoder for sequence classification (guided_jax.finetune).

A CSV/TSV/JSONL task (columns text,label; e.g. a hate-speech data set):

    python -m guided_jax.finetune --config configs/finetune.py --pretrained runs/default \
        --workdir runs/ft --config.data.train_file=train.csv --config.data.eval_file=test.csv

A GLUE task from TFDS (prepared beforehand with ``tfds build glue/cola``):

    python -m guided_jax.finetune --config configs/finetune.py --pretrained runs/default \
        --workdir runs/ft_cola --config.task=glue/cola
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.task = "table"  # "table": the files below; or "glue/<cola|sst2|mrpc|stsb|...>"
    config.regression = False  # table tasks: numeric labels, MSE loss, Pearson/Spearman
    config.split_seed = 0  # which rows are held out for validation (same for every seed)

    config.data = ml_collections.ConfigDict()
    config.data.train_file = ""  # .csv, .tsv or .jsonl
    config.data.validation_file = ""  # "" = hold out data.validation_fraction of train
    config.data.eval_file = ""  # scores are reported on this split
    config.data.text_column = "text"
    config.data.text_pair_column = ""  # a second text (sentence-pair tasks)
    config.data.label_column = "label"
    config.data.validation_fraction = 0.1
    config.data.tfds_data_dir = ""  # GLUE: where TFDS prepared it; "" = TFDS's default

    config.max_length = 128  # tokens per example, special tokens included
    config.batch_size = 16
    config.learning_rate = 2e-5
    config.warmup_fraction = 0.06
    config.weight_decay = 0.01
    config.epochs = 3
    config.eval_every = 0  # validation every this many steps; 0 = each epoch
    config.patience = 2  # stop after this many validations without improvement; 0 = never
    config.seeds = "1,2,3"  # one fine-tuning run per seed; results give mean ± std
    config.classifier_dropout = 0.1
    return config
