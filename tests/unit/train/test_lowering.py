"""The whole train step lowers for TPU (Mosaic) and GPU (Triton) from this CPU host, for every
attention kernel, at a tiny shape and at the reference's roberta_12 on blocks of 512; Pallas
kernels appear as one custom call per kernel and layer; an illegal kernel layout is an error."""

import pytest

from conftest import REPO
from guided_jax.config import load_config
from guided_jax.kernels import pallas
from guided_jax.train.lowering import lower_train_step

SHAPES = {
    "tiny": ("configs/tiny.py", {}),
    "roberta_12": ("configs/reference.py:roberta_12", {"dtype": "bfloat16"}),
}


def _config(shape: str, attention: str):
    path, model = SHAPES[shape]
    config = load_config(str(REPO / path))
    config.model.update(model, attention=attention)
    return config


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("attention", ["dense", "flash", "pallas"])
@pytest.mark.parametrize("shape", ["tiny", pytest.param("roberta_12", marks=pytest.mark.slow)])
def test_the_train_step_lowers(shape, attention, platform):
    config = _config(shape, attention)
    lowered = lower_train_step(config, platform)
    assert lowered.lines()[-1] == f"lowered platform={platform} attention={attention} ok"
    # Forward, dq and dk/dv kernels of every layer, on the platform's own compiler only.
    pallas_calls = 3 * config.model.num_layers if attention == "pallas" else 0
    mosaic, triton = "mosaic (TPU Pallas)", "triton (GPU Pallas)"
    assert lowered.custom_calls[mosaic] == (pallas_calls if platform == "tpu" else 0)
    assert lowered.custom_calls[triton] == (pallas_calls if platform == "cuda" else 0)
    assert lowered.custom_calls["mosaic_gpu (GPU Pallas)"] == 0
    assert lowered.stablehlo_bytes > 100_000


def test_a_sharded_step_lowers_for_several_chips():
    config = _config("tiny", "pallas")
    config.mesh.update(fsdp=2, tensor=2)
    config.train.batch_size = 8
    lowered = lower_train_step(config, "tpu", devices=8)
    # Spec 0,1,1,1 over 4 heads: the two tensor shards guide (next, prev) and (first, none),
    # so each layer holds the three kernels once per shard's patterns.
    assert lowered.devices == 8 and lowered.custom_calls["mosaic (TPU Pallas)"] == 3 * 2 * 2


def test_a_layout_mosaic_refuses_fails_to_lower(monkeypatch):
    """Tiles of 16 keys and one-lane rows are Triton's; Mosaic needs key blocks of 128 lanes."""
    triton_tiles = pallas.Tiling(16, 16, 1, pallas.default_tiling("tpu", "float32").compiler)
    monkeypatch.setattr(pallas, "default_tiling", lambda platform, dtype: triton_tiles)
    with pytest.raises(ValueError, match="block shape"):
        lower_train_step(_config("tiny", "pallas"), "tpu")


def test_unknown_platform_is_refused():
    with pytest.raises(ValueError, match=r"--platform must be one of \['tpu', 'cuda'\]"):
        lower_train_step(_config("tiny", "dense"), "rocm")
