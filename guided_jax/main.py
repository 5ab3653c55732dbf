r"""Pretraining, with attention guidance or (``guidance.enabled=false``) the plain MLM baseline.

    python -m guided_jax.main --config configs/default.py --workdir DIR
    python -m guided_jax.main --config configs/default.py --workdir runs/baseline \
        --config.train.steps=200 --config.guidance.enabled=false

Only parses flags; the work happens in :func:`guided_jax.train.loop.train_and_evaluate`. Any
config key can be overridden with ``--config.KEY=VALUE``, as above. Rerunning the same command
resumes from the newest checkpoint.

Configs: configs/default.py (the default job), configs/tiny.py (tests), configs/benchmark.py
and configs/reference.py:PRESET, the reference's model shapes, where PRESET is one of
roberta_4, roberta_8, roberta_12, roberta_16, roberta_self_24, roberta_self_48, bert_8,
bert_16, bert_self_24, bert_48, bert_attention_only_24.

Config keys, by section (--print_config prints every value and what it resolves to):
  data: train_files, eval_files, eval_fraction, block_size, format, tokenizer_kind,
   tokenizer_vocab_size, tokenizer_dir, mlm_probability, mlm_targets, cache_dir, ...
  model: hidden_size, num_layers, num_heads, intermediate_size, vocab_size, attention
   (dense, flash, pallas), dtype, dropout, attention_dropout, remat, from_dir, ...
  guidance: enabled, heads, tokens, scale, start_layer, after_dropout, ...
  train: steps or epochs, batch_size or per_device_batch_size, learning_rate, warmup_steps,
   eval_every, log_every, checkpoint_every, grad_accum_steps, seed, init_from, ...
  mesh: data, fsdp, tensor (-1 fills the devices), rules
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from guided_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints, tokenizer.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Join a multi-process run: jax.distributed.initialize() finds the coordinator on Cloud TPU "
    "VMs and under SLURM by itself.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for clusters JAX cannot detect."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, N).")
_PRINT_CONFIG = cli.define_print_config()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    import jax  # after flag parsing: --help stays fast

    from guided_jax.train import loop as train
    from guided_jax.train.metrics import summary
    from guided_jax.train.plan import plan_run

    with cli.command("main", argv):  # quiet from here: jax logs its connecting at INFO
        explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        if _DISTRIBUTED.value or any(v is not None for v in explicit):
            jax.distributed.initialize(*explicit)  # before any other JAX call
        if _PRINT_CONFIG.value:
            print("\n".join(plan_run(_CONFIG.value, _WORKDIR.value).lines()))
            return
        try:
            last = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
        except train.Interrupted as stop:
            sys.exit(f"guided_jax: {stop}")
    if jax.process_index() != 0:  # one report per run, not one per host
        return
    if not last:
        print(f"{_WORKDIR.value} already holds a finished run of this config")
        return
    print(summary(last))


if __name__ == "__main__":
    cli.run(main)
