"""Mesh, sharding rules and per-host batches; sharded training equals one-device training."""

import re
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import STEPS, assert_runs_match, run_config
from guided_jax import sharding
from guided_jax.train.inputs import prepare
from guided_jax.train.loop import train_and_evaluate
from guided_jax.train.step import build_train_program


def _meshrun_config(data: int, fsdp: int, tensor: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, rules=""))


# ----------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("sizes", "devices", "expected"),
    [((-1, 1, 1), 8, (8, 1, 1)), ((2, -1, 2), 8, (2, 2, 2)), ((1, 2, 2), 4, (1, 2, 2))],
)
def test_mesh_shape_fills_one_axis(sizes, devices, expected):
    assert sharding.mesh_shape(_meshrun_config(*sizes), devices) == expected


@pytest.mark.parametrize(
    ("sizes", "match"),
    [
        ((-1, -1, 1), "only one mesh axis may be -1"),
        ((3, -1, 1), "do not divide the 8 devices"),
        ((2, 2, 1), "needs 4 devices, but 8 are in use"),
        ((0, 1, 1), r"mesh.data=0"),
    ],
)
def test_mesh_shape_errors_name_the_problem(sizes, match):
    with pytest.raises(ValueError, match=match):
        sharding.mesh_shape(_meshrun_config(*sizes), 8)


def test_parse_rules_and_its_errors():
    rules = sharding.parse_rules("embed:fsdp, vocab:data+tensor, kv:")
    assert rules == {"embed": ("fsdp",), "vocab": ("data", "tensor"), "kv": ()}
    for bad, match in [
        ("embed", "LOGICAL:MESH_AXIS"),
        ("width:fsdp", "LOGICAL:MESH_AXIS"),
        ("embed:model", r"names mesh axes \['model'\]"),
        ("embed:fsdp,embed:tensor", "mapped twice"),
    ]:
        with pytest.raises(ValueError, match=match):
            sharding.parse_rules(bad)


def test_logical_spec_uses_each_mesh_axis_once_and_skips_indivisible_dims():
    mesh = sharding.make_mesh(_meshrun_config(2, 2, 2))
    rules = sharding.parse_rules("embed:fsdp,heads:tensor,vocab:tensor,mlp:tensor")
    assert sharding.logical_spec(("embed", "embed"), (32, 32), mesh, rules) == P("fsdp", None)
    assert sharding.logical_spec(("vocab", "embed"), (181, 32), mesh, rules) == P(None, "fsdp")
    assert sharding.logical_spec((None, "embed", "heads", "kv"), (3, 32, 4, 8), mesh, rules) == P(
        None, "fsdp", "tensor", None
    )


def test_local_rows_cover_the_batch_once_per_data_shard():
    mesh = sharding.make_mesh(_meshrun_config(2, 2, 2))
    batch_sharding = sharding.batch_sharding(mesh, 8)
    # One process holds every device here, hence every row.
    assert sharding.local_rows(batch_sharding, (8, 5)) == slice(0, 8)
    rows = np.arange(40, dtype=np.int32).reshape(8, 5)
    array = sharding.global_batch(batch_sharding, (8, 5), lambda r: rows[r])
    np.testing.assert_array_equal(np.asarray(array), rows)
    assert {s.data.shape for s in array.addressable_shards} == {(2, 5)}
    # A batch the data axes do not divide (a short eval batch) is replicated.
    assert sharding.batch_sharding(mesh, 6).spec == P()


def test_guidance_is_reduced_where_heads_and_examples_live(tiny_config, tmp_path):
    """No collective moves an attention map: each device scores its own heads/examples."""
    n = 24  # distinct from every other dimension of the tiny model
    tiny_config.data.block_size = n
    tiny_config.mesh.update(data=2, fsdp=2, tensor=2)
    inputs = prepare(tiny_config, tmp_path / "run")
    mesh = sharding.make_mesh(tiny_config.mesh)
    with jax.set_mesh(mesh):
        program = build_train_program(inputs, mesh)
    hlo = program.train_step.as_text()
    collectives = re.findall(
        r"= (\w+\[[\d,]*\])\S* (all-gather|all-to-all|collective-permute|all-reduce)\(", hlo
    )
    assert collectives, "expected the partitioned step to communicate"
    moved_maps = [shape for shape, _ in collectives if shape.endswith(f",{n},{n}]")]
    assert not moved_maps, f"attention maps cross devices: {moved_maps}"
    # Parameters really are split: e.g. the QKV kernel over fsdp (embed) and tensor (heads).
    qkv = program.state_shardings.params["layers"][0]["attention"]["qkv"]["kernel"]
    assert qkv.get_value().spec == P(None, "fsdp", "tensor", None)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def one_device_run(run_corpus, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one_device") / "run"
    train_and_evaluate(run_config(run_corpus), workdir, devices=jax.devices()[:1])
    return workdir


@pytest.mark.slow
def test_mesh_2x2x2_trains_like_one_device(one_device_run, sharded_run):
    assert_runs_match(one_device_run, sharded_run)


@pytest.mark.slow
def test_checkpoint_of_8_devices_resumes_on_4(one_device_run, sharded_run, run_corpus, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(sharded_run, workdir)
    shutil.rmtree(workdir / "checkpoints" / str(STEPS))  # as if stopped after step 10
    config = run_config(run_corpus, data=1, fsdp=2, tensor=2)
    train_and_evaluate(config, workdir, devices=jax.devices()[:4])
    assert_runs_match(one_device_run, workdir)
