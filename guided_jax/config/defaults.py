"""Default experiment config and the reference's model shapes (``ml_collections``).

Files under ``configs/`` start from :func:`base_config` and change what their experiment needs;
every key can be overridden on the command line, e.g. ``--config.train.steps=100``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util

import ml_collections

from guided_jax.model import ModelConfig

# The reference's ag_config/ shapes: layers, width, heads, FFN (0 = attention-only layers).
# Its oromo_config/ directories hold the same RoBERTa shapes (roberta_8/12/16, self_24/48).
_BERT = dict(
    model_type="bert",
    vocab_size=30101,
    max_position_embeddings=512,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
)
MODEL_PRESETS: dict[str, dict[str, object]] = {
    "roberta_4": dict(num_layers=4, hidden_size=512, num_heads=8, intermediate_size=2048),
    "roberta_8": dict(num_layers=8, hidden_size=768, num_heads=12, intermediate_size=3072),
    "roberta_12": dict(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072),
    "roberta_16": dict(num_layers=16, hidden_size=768, num_heads=16, intermediate_size=3072),
    "roberta_self_24": dict(num_layers=24, hidden_size=768, num_heads=12, intermediate_size=0),
    "roberta_self_48": dict(num_layers=48, hidden_size=768, num_heads=12, intermediate_size=0),
    # filipino_config/: BERT with WordPiece (vocab 30,101, 512 positions, two token types).
    "bert_8": dict(_BERT, num_layers=8, hidden_size=768, num_heads=12, intermediate_size=3072),
    "bert_16": dict(_BERT, num_layers=16, hidden_size=768, num_heads=16, intermediate_size=3072),
    # filipino_config/self_attention_24 names BertForMaskedLMOnlyAttention, but its model_type
    # "bert" makes the reference's AutoModelWithLMHead.from_config build full BERT layers: what
    # the paper's Filipino run trained. bert_attention_only_24 is what the directory's name meant.
    "bert_self_24": dict(
        _BERT, num_layers=24, hidden_size=768, num_heads=12, intermediate_size=3072
    ),
    "bert_attention_only_24": dict(
        _BERT, num_layers=24, hidden_size=768, num_heads=12, intermediate_size=0
    ),
    # filipino_config/self_attention_48's config.json names BertForMaskedLM: full layers.
    "bert_48": dict(_BERT, num_layers=48, hidden_size=768, num_heads=12, intermediate_size=3072),
}
# ModelConfig fields that come from the tokenizer, not from the config file.
_FROM_TOKENIZER = ("pad_token_id",)


def model_config(preset: str | None = None, **overrides: object) -> ml_collections.ConfigDict:
    """The ``model`` section: :class:`~guided_jax.model.ModelConfig`'s defaults (the reference's
    RoBERTa: vocab 52,000, 514 positions, dropout 0.1), or those of a preset (``bert_*``: the
    reference's BERT settings), then ``overrides``.

    Besides the architecture it holds ``from_dir``: a reference-style directory (config.json +
    tokenizer files) whose config.json gives every key but ``dtype``, ``remat`` and
    ``attention``, and whose tokenizer is used unless ``data.tokenizer_dir`` names another.
    ``vocab_size=-1`` takes the tokenizer's size."""
    config = ml_collections.ConfigDict()
    config.from_dir = ""
    for field in dataclasses.fields(ModelConfig):
        if field.name not in _FROM_TOKENIZER:
            config[field.name] = field.default
    if preset is not None:
        if preset not in MODEL_PRESETS:
            close = difflib.get_close_matches(preset, sorted(MODEL_PRESETS), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ValueError(
                f"unknown model preset {preset!r}; {hint}the presets are "
                f"{', '.join(sorted(MODEL_PRESETS))}"
            )
        config.update(MODEL_PRESETS[preset])
    config.update(overrides)
    return config


def base_config() -> ml_collections.ConfigDict:
    """The reference run: blocks of 512, AdamW 5e-5 with linear decay, clip 1.0, spec 0,1,1,4."""
    config = ml_collections.ConfigDict()
    config.model = model_config("roberta_12")

    config.data = ml_collections.ConfigDict()
    config.data.train_files = ""  # comma-separated paths or globs; "" = embedded default corpus
    config.data.eval_files = ""  # "" = hold out the last data.eval_fraction of the train blocks
    config.data.eval_fraction = 0.05
    config.data.block_size = 512
    # vocab.json + merges.txt (BPE) or vocab.txt (WordPiece); "" = train one into WORKDIR
    config.data.tokenizer_dir = ""
    # bpe | wordpiece: what to train; with a tokenizer_dir, the kind found there (recorded)
    config.data.tokenizer_kind = "bpe"
    config.data.tokenizer_vocab_size = 52000
    config.data.mlm_probability = 0.15
    # which tokens MLM may select: "no_specials" = all but <s>, </s>, pad, <unk>, <mask>;
    # "reference" = all but <s>, </s>, pad, as the reference's collator (<unk> is predicted)
    config.data.mlm_targets = "no_specials"
    # Sources (train_files/eval_files): paths or globs (local or gs://), tfds:NAME[/CONFIG]:SPLIT
    # or cache:DIR; see guided_jax/data/sources.py.
    config.data.documents = "line"  # text files: one document per "line" or per "paragraph"
    # "documents": text files split per data.documents, eval_fraction held out unless eval_files;
    # "reference_text": each file read whole and tokenized with the reference's special-token
    # rule, every block trained on, eval only on data.eval_files (its TextDataset)
    config.data.format = "documents"
    config.data.text_field = "text"  # the text feature of a TFDS source
    config.data.tfds_data_dir = ""  # where TFDS sources are prepared; "" = TFDS's default
    config.data.cache_dir = ""  # tokenized blocks, reused by reruns; "" = WORKDIR/token_cache
    config.data.tokenizer_max_documents = 1_000_000  # sample to train a tokenizer on; 0 = all
    # more text files than this (bytes) are refused unless prepared with python -m
    # guided_jax.prepare (then data.cache_dir); 0 = no limit
    config.data.max_inline_bytes = 4_000_000_000
    config.data.prefetch = 2  # batches read ahead on background threads
    # true: each token attends only to its own document within a packed block; the block's
    # <s> and </s> still see and are seen by every document (off = the reference)
    config.data.document_masks = False

    config.train = ml_collections.ConfigDict()
    config.train.steps = 10000  # the run's length, or 0 when train.epochs gives it
    # > 0 (with train.steps=0): steps follow from epochs over the training blocks, as the
    # reference counts them (int(ceil(blocks / micro-batch) // grad_accum_steps * epochs)) and
    # are recorded in WORKDIR/config.json; setting both is refused
    config.train.epochs = 0.0
    config.train.batch_size = 4  # global: examples per optimizer step, over every device
    # > 0: the reference's --per_gpu_train_batch_size; the global batch is then this x the
    # devices that split the batch (mesh data x fsdp) x grad_accum_steps
    config.train.per_device_batch_size = 0
    config.train.seed = 42
    config.train.learning_rate = 5e-5
    config.train.warmup_steps = 0
    config.train.weight_decay = 0.0
    config.train.adam_b1 = 0.9
    config.train.adam_b2 = 0.999
    config.train.adam_eps = 1e-8
    config.train.grad_clip_norm = 1.0
    config.train.log_every = 50
    config.train.eval_every = 500
    config.train.eval_batches = 20
    config.train.checkpoint_every = 1000  # 0 = only at the end
    config.train.keep_checkpoints = 2
    config.train.grad_accum_steps = 1  # micro-batches per optimizer step (same global batch)
    # A HuggingFace-format directory (config.json + model.safetensors, e.g. exported with
    # python -m guided_jax.hf_interop) whose weights start the run instead of the seeded init.
    config.train.init_from = ""
    # Comma-separated steps, or percentages of train.steps ("1%,100%", counted after epochs),
    # whose checkpoints are saved and kept besides the newest ones (guided_jax.reproduce keeps
    # those it plots attention maps of).
    config.train.keep_steps = ""
    # Per-head attention statistics (diag/... in metrics.jsonl) on log steps; see
    # README.md (Diagnostics while training) for what they cost.
    config.train.diagnostics = False

    # Devices: data x fsdp x tensor (-1 = all remaining devices). Changing the mesh between
    # runs of one workdir is allowed: checkpoints restore onto any mesh.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1
    config.mesh.fsdp = 1
    config.mesh.tensor = 1
    config.mesh.rules = "embed:fsdp,heads:tensor,mlp:tensor,vocab:tensor"  # logical:mesh axes

    config.guidance = ml_collections.ConfigDict()
    config.guidance.enabled = True
    config.guidance.heads = "0,1,1,4"  # self,next,prev,first; or "next:1,prev:1,token[</s>]:2"
    config.guidance.tokens = ""  # comma-separated tokens for counts after the fourth
    config.guidance.start_layer = 0
    # what the layers below start_layer leave out: "all" groups, or only the "tokens" groups
    # (the reference's probing code; positional groups are then guided in every layer)
    config.guidance.start_layer_groups = "all"
    config.guidance.scale = 100.0
    config.guidance.stagnant_steps = 20000
    config.guidance.after_dropout = True  # reference: the loss sees dropped-out probabilities
    return config


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads ``path/to/config.py[:arg]`` the way ``--config`` does, for scripts and tests."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("guided_jax_config_file", path)
    if module_spec is None or module_spec.loader is None:
        raise FileNotFoundError(f"config file {path} not found")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
