r"""Check a config's train step for an accelerator this host does not have.

Lower it for a TPU or a GPU (do its kernels, Pallas included, lower for that platform?):

    python -m guided_jax.lower --config configs/reference.py:roberta_12 --platform tpu \
        --config.model.attention=pallas --config.model.dtype=bfloat16
    python -m guided_jax.lower --config configs/tiny.py --platform cuda --devices 8 \
        --config.mesh.fsdp=2 --config.train.batch_size=8

Lowering ends with ``lowered platform=P attention=A ok``. Compile it for a TPU slice, with
libtpu (``pip install "jax[tpu]"`` of the installed jax) and no TPU, as the slice will run it:

    python -m guided_jax.lower --config configs/reference.py:roberta_12 --topology v5e:2x2 \
        --config.model.attention=pallas --config.model.dtype=bfloat16

``--topology`` takes a slice (``v5e:2x2``, ``v4:2x2x1``, ``v5e:16x16``) or gcloud's accelerator
type (``v5litepod-4``, ``v4-8``). The train and eval steps compile with the run's own
shardings over the mesh ``config.mesh`` lays on the slice; it prints each chip's memory
against its HBM, the FLOPs per step and the compile time, and last
``compiled topology=T chips=N attention=A per_chip_gib=X of Y fits``. A step that does not
fit, or that XLA:TPU or Mosaic refuses (e.g. a Pallas block larger than VMEM), exits with
status 1 and says what to change. A GPU cannot be compiled for without one: ``--platform
cuda`` only lowers. Only parses flags; the work happens in
:mod:`guided_jax.train.lowering`.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from guided_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
_PLATFORM = flags.DEFINE_enum("platform", None, ["tpu", "cuda"], "Platform to lower for.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU slice to compile for, e.g. v5e:2x2 or v5litepod-16 (needs libtpu)."
)
_DEVICES = flags.DEFINE_integer("devices", 1, "Chips the mesh spans (lowering).", lower_bound=1)
_DEVICE_KIND = flags.DEFINE_string(
    "device_kind", None, "The chip, as jax names it (default: 'TPU v5 lite' or an H100)."
)
_PRINT_CONFIG = cli.define_print_config()
flags.mark_flags_as_required(["config"])
flags.register_validator(
    "platform",
    lambda _: (_PLATFORM.value is None) != (_TOPOLOGY.value is None),
    message="give --platform (lower) or --topology (compile for a TPU slice), not both",
)


def main(argv: list[str]) -> None:
    from guided_jax.train import lowering

    with cli.command("lower", argv):
        if _PRINT_CONFIG.value:
            plan = lowering.plan_lowering(
                _CONFIG.value, platform=_PLATFORM.value, devices=_DEVICES.value,
                device_kind=_DEVICE_KIND.value, topology=_TOPOLOGY.value,
            )  # fmt: skip
            print("\n".join(plan.lines()))
            return
        if _TOPOLOGY.value is None:
            lowered = lowering.lower_train_step(
                _CONFIG.value, _PLATFORM.value, devices=_DEVICES.value,
                device_kind=_DEVICE_KIND.value,
            )  # fmt: skip
            print("\n".join(lowered.lines()))
            return
        compiled = lowering.compile_for_topology(_CONFIG.value, _TOPOLOGY.value)
        print("\n".join(compiled.lines()))
        if not compiled.fits:
            sys.exit(f"guided_jax.lower: error: {compiled.advice()}")


if __name__ == "__main__":
    cli.run(main)
