"""The train and eval steps compile for a real TPU slice on this CPU host (libtpu, no TPU):
XLA:TPU and Mosaic run for every attention kernel, Pallas included on several chips and with
the heads split over the tensor axis; the per-chip memory is that of the run's shardings; an
oversized batch and a Pallas block larger than VMEM are refused before a slice is rented."""

import math
import subprocess
import sys

import jax
import pytest

from conftest import REPO, cli_env
from guided_jax.config import load_config
from guided_jax.kernels import pallas
from guided_jax.train import lowering

pytest.importorskip("libtpu", reason="compiling for a TPU slice needs libtpu (the test extra)")

TOPOLOGY = "v5e:2x2"


def _guided(attention: str, **mesh):
    """configs/tiny.py widened to TPU tiles (d=256, 4 heads of 64, FFN 512, 512 tokens, blocks
    of 128: small arrays would be mostly tile padding), with attention dropout on and the
    reference's spec's first three groups (next, prev, first; the last head unguided)."""
    config = load_config(str(REPO / "configs/tiny.py"))
    config.model.update(
        attention=attention, attention_dropout=0.1, dtype="bfloat16", hidden_size=256,
        num_heads=4, intermediate_size=512, vocab_size=512, max_position_embeddings=130,
    )  # fmt: skip
    config.data.block_size = 128
    config.guidance.heads = "0,1,1,1"
    config.mesh.update(mesh)
    config.train.batch_size = 8
    return config


def _state_bytes_per_device(config) -> float:
    """The train state's bytes on one device, from the shapes of the model and optimizer state
    and the shardings the run's rules give them: what XLA must report as the step's
    arguments, less the batch."""
    from guided_jax import sharding
    from guided_jax.train.lowering import _prepared
    from guided_jax.train.step import step_functions

    devices = lowering.topology_devices(TOPOLOGY)
    mesh = sharding.make_mesh(config.mesh, devices)
    config, model, objective = _prepared(config, sharding.batch_axes_size(mesh))
    _, init_state, _ = step_functions(model, objective, config.train)
    with jax.set_mesh(mesh):
        state = jax.eval_shape(init_state)
        shardings = sharding.tree_shardings(state, mesh, sharding.parse_rules(config.mesh.rules))
    total = 0.0
    for leaf, placed in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
        shard = placed.shard_shape(leaf.shape)
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


@pytest.mark.parametrize("attention", ["dense", "flash", "pallas"])
def test_a_guided_step_compiles_for_four_chips(attention):
    config = _guided(attention)
    compiled = lowering.compile_for_topology(config, TOPOLOGY)
    assert (compiled.chips, compiled.processes, compiled.device_kind) == (4, 1, "TPU v5 lite")
    assert compiled.mesh == {"data": 4, "fsdp": 1, "tensor": 1}
    assert compiled.per_device_batch == 2 and compiled.fits
    last = compiled.lines()[-1]
    assert last.startswith(f"compiled topology={TOPOLOGY} chips=4 attention={attention} ")
    assert last.endswith(f"per_chip_gib={compiled.per_chip_gib:.2f} of 16.0 fits")
    # arguments = the replicated train state + this chip's two rows of 128 int32 tokens
    state = _state_bytes_per_device(config)
    assert compiled.train.arguments == pytest.approx(state + 2 * 128 * 4, rel=0.01)
    assert compiled.train.aliased >= 0.95 * state  # the donated state is updated in place
    assert compiled.train_flops > 0


def test_fsdp_shards_the_state_and_pallas_splits_heads_over_tensor():
    data_parallel = _state_bytes_per_device(_guided("pallas"))
    config = _guided("pallas", data=1, fsdp=2, tensor=2)
    compiled = lowering.compile_for_topology(config, TOPOLOGY)
    assert compiled.mesh == {"data": 1, "fsdp": 2, "tensor": 2} and compiled.fits
    sharded = _state_bytes_per_device(config)
    assert sharded < 0.3 * data_parallel
    # XLA pads the small shards to TPU tiles, so it holds somewhat more than the shards
    assert sharded + 4 * 128 * 4 <= compiled.train.arguments < 0.45 * data_parallel


def test_the_command_prints_the_fit_and_refuses_an_oversized_batch():
    def lower(*overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "guided_jax.lower", "--config", "configs/tiny.py",
             "--topology", "v5litepod-4", "--config.model.attention=pallas", *overrides],
            cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600,
        )  # fmt: skip

    fits = lower()
    assert fits.returncode == 0, fits.stderr[-3000:]
    assert fits.stderr == ""  # libtpu's probes of a host without a TPU stay off the screen
    lines = fits.stdout.strip().splitlines()
    assert lines[0].startswith(f"compiled for {TOPOLOGY} (v5litepod-4): 4 x TPU v5 lite")
    assert lines[-1].startswith(f"compiled topology={TOPOLOGY} chips=4 attention=pallas ")
    assert lines[-1].endswith(" of 16.0 fits")

    # 2**19 examples of 32 tokens a chip: the logits alone are 2**19 * 32 * 400 floats
    too_big = lower("--config.train.per_device_batch_size=524288")
    assert too_big.returncode == 1, too_big.stderr[-3000:]
    assert too_big.stdout == "" and "Traceback" not in too_big.stderr
    error = too_big.stderr.strip().splitlines()[-1]
    assert error.startswith("guided_jax.lower: error: the step does not fit a v5e chip: ")
    assert "exceeds available HBM" in error  # XLA:TPU's own words
    for remedy in ("--config.mesh.fsdp", "train.per_device_batch_size (now 524288)",
                   "train.grad_accum_steps", "--config.model.remat=full"):  # fmt: skip
        assert remedy in error


def test_a_pallas_block_larger_than_vmem_is_refused_at_compile(monkeypatch):
    """Lowering accepts any block; only Mosaic's compile knows the chip's VMEM (128 MiB on
    v5e): a [2048, 2048] float32 score tile is 16 MiB, and the kernel holds several."""
    tpu = pallas.default_tiling("tpu", "float32")
    huge = pallas.Tiling(2048, 2048, 128, tpu.compiler)
    monkeypatch.setattr(pallas, "default_tiling", lambda platform, dtype: huge)
    lowering.lower_train_step(_guided("pallas"), "tpu")  # lowers fine
    with pytest.raises(lowering.CompileError, match=r"(?i)vmem"):
        lowering.compile_for_topology(_guided("pallas"), TOPOLOGY)


@pytest.mark.parametrize(
    ("given", "topology", "gcloud"),
    [
        ("v5e:2x2", "v5e:2x2", "v5litepod-4"),
        ("v5litepod-8", "v5e:2x4", "v5litepod-8"),
        ("v5e-64", "v5e:8x8", "v5litepod-64"),
        ("v5litepod-256", "v5e:16x16", "v5litepod-256"),
        ("v6e-16", "v6e:4x4", "v6e-16"),
        ("v4-8", "v4:2x2x1", "v4-8"),
        ("v4-32", "v4:2x2x4", "v4-32"),
        ("v4-64", "v4:2x4x4", "v4-64"),
        ("v4-128", "v4:4x4x4", "v4-128"),
        ("v5p-8", "v5p:2x2x1", "v5p-8"),
        ("v5p-256", "v5p:4x4x8", "v5p-256"),
    ],
)
def test_topologies_from_gcloud_accelerator_types(given, topology, gcloud):
    """Cloud TPU's documented slice shapes (v4 and v5p count TensorCores, two a chip)."""
    assert lowering.topology_name(given) == topology
    assert lowering.gcloud_accelerator_type(topology) == gcloud


def test_an_unknown_topology_is_refused():
    with pytest.raises(ValueError, match=r"--topology 'v9x-4': expected a slice such as"):
        lowering.topology_name("v9x-4")
    with pytest.raises(ValueError, match="power-of-two number of chips, got 12"):
        lowering.topology_name("v5e-12")
    with pytest.raises(ValueError, match=r"'v4-9': v4-N counts TensorCores, two a chip"):
        lowering.topology_name("v4-9")
    for slice_name in ("v5e:2x3", "v4:1x1", "v5e:2x2x1"):
        with pytest.raises(ValueError, match=rf"--topology '{slice_name}': a v\w+ slice is"):
            lowering.topology_name(slice_name)


def test_with_libtpu_installed_a_cpu_host_starts_quietly():
    """libtpu (the test and tpu extras) would probe for a TPU at jax's start and print its
    failures; the commands start the CPU backend alone on a host without one."""
    env = {key: value for key, value in cli_env().items() if key != "JAX_PLATFORMS"}
    lowered = subprocess.run(
        [sys.executable, "-m", "guided_jax.lower", "--config", "configs/tiny.py",
         "--platform", "tpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert lowered.returncode == 0, lowered.stderr[-3000:]
    assert lowered.stderr == ""
    assert lowered.stdout.strip().endswith("lowered platform=tpu attention=dense ok")
