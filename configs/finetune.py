"""Fine-tuning a pretrained encoder for sequence classification (guided_jax.finetune).

A CSV/TSV/JSONL task (columns text,label; e.g. a hate-speech data set):

    python -m guided_jax.finetune --config configs/finetune.py --pretrained runs/default \
        --workdir runs/ft --config.data.train_file=train.csv --config.data.eval_file=test.csv

A GLUE task from TFDS, prepared beforehand in the array_record format it is read in, where
TensorFlow is installed (README.md), with ``tfds build glue/cola --file_format=array_record``:

    python -m guided_jax.finetune --config configs/finetune.py --pretrained runs/default \
        --workdir runs/ft_cola --config.task=glue/cola

Two protocols (``config.protocol``):

* ``selected`` (this file's default): ``data.validation_fraction`` of the train rows (or
  ``data.validation_file``) is validated every epoch (or ``eval_every`` steps), training stops
  after ``patience`` validations without improvement, and the best validation checkpoint is
  scored on the eval split, for each of several seeds. The learning rate is chosen as papers
  report GLUE: each of ``learning_rates`` is trained with the first seed and scored on
  validation only, and the best is run with every seed (one value: no selection). Small
  encoders want rates far above BERT-base's 2e-5, so the candidates span 1e-5 to 1e-3
  (measured: d=32 and d=128 encoders learned a keyword task in 3 epochs only from 1e-3 up).
* ``reference`` (``--config configs/finetune.py:reference``): the reference implementation's
  GLUE fine-tuning (ameet-1997/AttentionGuidance, whose ``attention_guidance/README.md`` sends
  GLUE runs to HuggingFace's ``examples/text-classification/run_glue.py`` and its README): the
  full train split (every row, each epoch, the last batch partial), a fixed number of epochs,
  no validation or early stopping, and the final parameters scored on the eval split (GLUE's
  dev). ``eval_every``, ``patience``, ``split_seed`` and ``data.validation_fraction`` are not
  used; ``data.validation_file`` must stay empty. See :func:`reference` for where each value
  comes from.
"""

import ml_collections

PROTOCOLS = ("selected", "reference")


def get_config(arg: str | None = None):
    """Our ``selected`` protocol; ``arg="reference"`` (``configs/finetune.py:reference``) gives
    the reference's protocol and hyperparameters."""
    if arg not in (None, "", *PROTOCOLS):
        raise ValueError(
            f"configs/finetune.py:<arg>: expected one of {list(PROTOCOLS)}, got {arg!r}"
        )
    config = ml_collections.ConfigDict()
    # "selected": validate, stop early, score the best checkpoint; "reference": the full train
    # split for a fixed number of epochs, the final parameters scored (see the docstring).
    config.protocol = "selected"
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
    # A row with an empty or missing label stops the run with its file line numbers; true leaves
    # such rows out instead (results.json's "dropped_rows" counts them per file).
    config.data.drop_empty_labels = False
    config.data.validation_fraction = 0.1
    config.data.tfds_data_dir = ""  # GLUE: where TFDS prepared it; "" = TFDS's default

    config.max_length = 128  # tokens per example, special tokens included
    config.batch_size = 16
    # candidates, each trained with the first seed and scored on validation; the best is run
    # with every seed (one value: used as it is)
    config.learning_rates = "1e-5,3e-5,1e-4,3e-4,1e-3"
    config.warmup_fraction = 0.06
    config.weight_decay = 0.01
    config.adam_eps = 1e-8
    config.grad_clip_norm = 1.0  # global gradient norm clipped to this; 0 = no clipping
    config.epochs = 3
    config.eval_every = 0  # validation every this many steps; 0 = each epoch
    config.patience = 2  # stop after this many validations without improvement; 0 = never
    config.seeds = "1,2,3"  # one fine-tuning run per seed; results give mean ± std
    config.classifier_dropout = 0.1
    if arg == "reference":
        reference(config)
    return config


def reference(config: ml_collections.ConfigDict) -> None:
    """Sets the reference's protocol and hyperparameters (ameet-1997/AttentionGuidance). Its
    ``attention_guidance/examples/text-classification/run_glue.py`` parses HuggingFace's
    ``TrainingArguments`` (``attention_guidance/src/transformers/training_args.py``) and
    ``GlueDataTrainingArguments`` (``attention_guidance/src/transformers/data/datasets/glue.py``);
    the GLUE command of ``attention_guidance/examples/text-classification/README.md`` (where
    ``attention_guidance/README.md`` points for GLUE) passes ``--max_seq_length 128
    --per_device_train_batch_size 32 --learning_rate 2e-5 --num_train_epochs 3.0``, which win
    over the defaults. Each value and its source:

    - learning_rate 2e-5: README ``--learning_rate 2e-5`` (argparse default 5e-5)
    - epochs 3: README ``--num_train_epochs 3.0`` (default 3.0)
    - batch_size 32: README ``--per_device_train_batch_size 32`` (default 8)
    - max_length 128: README ``--max_seq_length 128`` (glue.py default 128)
    - warmup_fraction 0: ``--warmup_steps`` default 0
    - weight_decay 0: ``--weight_decay`` default 0.0
    - adam_eps 1e-8: ``--adam_epsilon`` default 1e-8
    - grad_clip_norm 1.0: ``--max_grad_norm`` default 1.0
    - seeds 42: ``--seed`` default 42 (one run)
    - classifier_dropout 0.1: ``hidden_dropout_prob`` of ``attention_guidance/ag_config/
      roberta_12/config.json`` (RoBERTa's classification head drops out with it)

    Its Trainer (``attention_guidance/src/transformers/trainer.py``) shuffles the whole train
    split each epoch and keeps the last partial batch (``--dataloader_drop_last`` default
    False), decays the learning rate linearly to 0 and validates nothing during training
    (``--evaluate_during_training`` default False); ``run_glue.py`` then scores the model left
    after training on the dev split. Not the same: its data order (torch's RNG), and where Adam's
    epsilon goes (HuggingFace's AdamW adds it to the square root of the uncorrected second
    moment, optax to the bias-corrected one; at 1e-8 the difference is negligible)."""
    config.protocol = "reference"
    del config.learning_rates  # one fixed rate, no selection
    config.learning_rate = 2e-5
    config.epochs = 3
    config.batch_size = 32
    config.max_length = 128
    config.warmup_fraction = 0.0
    config.weight_decay = 0.0
    config.adam_eps = 1e-8
    config.grad_clip_norm = 1.0
    config.seeds = "42"
    config.classifier_dropout = 0.1
