"""Lower a config's whole train step for a TPU or a GPU without one: do its kernels (Pallas
included) lower for that platform?

    python -m guided_jax.lower --config configs/reference.py:roberta_12 --platform tpu \
        --config.model.attention=pallas --config.model.dtype=bfloat16
    python -m guided_jax.lower --config configs/tiny.py --platform cuda --devices 8 \
        --config.mesh.fsdp=2 --config.train.batch_size=8

It prints what it lowered (attention kind, custom calls, StableHLO size) and, last,
``lowered platform=P attention=A ok``; a lowering error exits with status 1. Only parses
flags; the work happens in :func:`guided_jax.train.lowering.lower_train_step`.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from guided_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
_PLATFORM = flags.DEFINE_enum("platform", None, ["tpu", "cuda"], "Platform to lower for.")
_DEVICES = flags.DEFINE_integer("devices", 1, "Chips the mesh spans.", lower_bound=1)
_DEVICE_KIND = flags.DEFINE_string(
    "device_kind", None, "The chip, as jax names it (default: 'TPU v5 lite' or an H100)."
)
flags.mark_flags_as_required(["config", "platform"])


def main(argv: list[str]) -> None:
    from guided_jax.train.lowering import lower_train_step

    with cli.command("lower", argv):
        lowered = lower_train_step(
            _CONFIG.value, _PLATFORM.value, devices=_DEVICES.value, device_kind=_DEVICE_KIND.value
        )
    print("\n".join(lowered.lines()))


if __name__ == "__main__":
    app.run(main)
