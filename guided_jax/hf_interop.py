"""Export a checkpoint as a HuggingFace model directory (config.json, model.safetensors written
without torch, the tokenizer files) that ``transformers`` loads with the same logits.

    python -m guided_jax.hf_interop --workdir runs/default --out exported/default
    python -m guided_jax.hf_interop --workdir runs/default --out exported/step200 --step 200

Without ``--step`` the newest checkpoint is exported.

Only parses flags; the work happens in :func:`guided_jax.weights.hf.export`.
"""

from __future__ import annotations

from absl import flags

from guided_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Pretraining workdir (or a HuggingFace directory).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the newest).")
_OUT = flags.DEFINE_string(
    "out", None, "Directory to write config.json, model.safetensors and the tokenizer files to."
)
flags.mark_flags_as_required(["workdir", "out"])


def main(argv: list[str]) -> None:
    from guided_jax import weights
    from guided_jax.model.hf_config import HF_CLASSES
    from guided_jax.weights.hf import export

    with cli.command("hf_interop", argv):
        loaded = weights.load(_WORKDIR.value, _STEP.value)
        out = export(loaded.model, loaded.tokenizer, _OUT.value, step=loaded.step)
    where = f"step {loaded.step} of {loaded.source}" if loaded.step is not None else loaded.source
    print(f"exported {where} to {out} ({HF_CLASSES[loaded.config.model_type]})")


if __name__ == "__main__":
    cli.run(main)
