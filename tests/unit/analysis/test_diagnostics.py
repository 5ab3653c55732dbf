"""Head diagnostics (guided_jax.guidance.stats): their values on hand-made maps, a tiny run that
logs them (with a per-layer spec and a registered pattern whose builder is counted) and their
heat maps over the run (guided_jax.analysis.head_history)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, write_corpus
from guided_jax.analysis import head_history
from guided_jax.config import load_config
from guided_jax.guidance import HeadSpec, parse_spec, register_pattern, stats, token_masks
from guided_jax.train.loop import train_and_evaluate
from guided_jax.train.metrics import read_metrics

PNG = b"\x89PNG\r\n\x1a\n"
N = 6


def _maps() -> np.ndarray:
    """One layer, 5 heads: exactly next, exactly first, uniform, exactly self, ±1 window."""
    maps = np.zeros((2, 5, N, N), np.float32)
    maps[:, 0] = np.eye(N, k=1)
    maps[:, 0, -1, -1] = 1.0  # the last row has no next key: it attends to itself
    maps[:, 1, :, 0] = 1.0
    maps[:, 2] = 1.0 / N
    maps[:, 3] = np.eye(N)
    band = (np.abs(np.arange(N)[:, None] - np.arange(N)[None, :]) <= 1).astype(np.float32)
    maps[:, 4] = band / band.sum(-1, keepdims=True)
    return maps


def test_guided_heads_report_mass_on_their_target() -> None:
    spec = HeadSpec.parse("next:1,first:1,token[9]:1")
    ids = np.full((2, N), 5)
    ids[:, 2] = 9
    masks = token_masks(jnp.asarray(ids), [9])
    query = jnp.ones((2, N), bool)
    values = stats.head_diagnostics([jnp.asarray(_maps())], spec, query, masks)
    mass, closest, entropy = (np.asarray(values[k])[0] for k in ("mass", "closest", "entropy"))
    np.testing.assert_allclose(mass[:2], [1.0, 1.0], rtol=1e-6)  # next (rows 0..n-2), first
    np.testing.assert_allclose(mass[2], 1.0 / N, rtol=1e-6)  # the uniform head on the token
    assert closest[:3].tolist() == [-1, -1, -1]
    assert closest[3] == stats.BUILTIN.index("self") and mass[3] == 1.0
    np.testing.assert_allclose(entropy[2], math.log(N), rtol=1e-6)
    np.testing.assert_allclose(entropy[[0, 1, 3]], 0.0, atol=1e-7)


def test_unguided_heads_name_their_closest_builtin_pattern() -> None:
    values = stats.head_diagnostics([jnp.asarray(_maps())], None, jnp.ones((2, N), bool))
    closest = np.asarray(values["closest"])[0].tolist()
    assert closest[:2] == [stats.BUILTIN.index("next"), stats.BUILTIN.index("first")]
    assert closest[3] == stats.BUILTIN.index("self")
    # the window head spreads a third of its mass (half on the edge rows) on each neighbour
    assert np.asarray(values["mass"])[0, 4] == pytest.approx((2 / 2 + 4 / 3) / 6, rel=1e-6)


def test_registered_pattern_mass_and_padding_rows() -> None:
    spec = parse_spec("layers=1:first:1,window1:1")
    maps = jnp.asarray(np.stack([_maps(), _maps()]))  # two layers
    query = jnp.asarray(np.arange(N)[None, :] < np.array([[N], [N - 2]]))
    values = stats.head_diagnostics(list(maps), spec, query)
    mass, closest = np.asarray(values["mass"]), np.asarray(values["closest"])
    assert closest[0].min() >= 0  # layer 0 is unguided
    assert closest[1].tolist()[:2] == [-1, -1]
    # head 1 of layer 1 is the exact first pattern, but guided towards window1: ±1 band mass
    band_on_first = np.asarray([1.0, 1.0, 0, 0, 0, 0])  # rows 0, 1 have key 0 in their band
    real = np.asarray(query)
    want = (band_on_first[None] * real).sum() / real.sum()
    np.testing.assert_allclose(mass[1, 1], want, rtol=1e-6)
    flat = stats.flat_metrics(values, spec)
    assert "diag/closest/L1H1" not in flat and "diag/closest/L1H2" in flat
    assert "diag/closest/L0H0" in flat and len(flat) == 2 * 5 * 3 - 2


class _CountingBuilder:
    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, n: int) -> np.ndarray:
        self.calls.append(n)
        return np.eye(n, k=-2)


@pytest.fixture(scope="module")
def diag_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("diagnostics")
    builder = _CountingBuilder()
    register_pattern("test_run_prev2", builder, replace=True)
    config = load_config(str(REPO / "configs" / "tiny.py"))
    config.data.train_files = str(write_corpus(root / "corpus.txt"))
    config.guidance.heads = "layers=0:next:1,test_run_prev2:1;1:first:1,window1:2"
    config.train.diagnostics = True
    config.train.steps = 8
    # Without attention-dropout noise the guided losses fall step by step even in 8 steps.
    config.model.attention_dropout = 0.0
    train_and_evaluate(config, root / "run", devices=jax.devices()[:1])
    return root / "run", builder


def test_registered_pattern_trains_and_its_target_is_built_once(diag_run) -> None:
    workdir, builder = diag_run
    assert builder.calls == [32]  # one length: built once for the train, eval and diag steps
    records = [r for r in read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    for name in ("next", "test_run_prev2", "first", "window1"):
        values = [r[f"ag_loss/{name}"] for r in records]
        assert all(v > 0 and math.isfinite(v) for v in values), name
    assert records[-1]["ag_loss/test_run_prev2"] < records[0]["ag_loss/test_run_prev2"]
    sums = [sum(r[f"ag_loss/{n}"] for n in ("next", "test_run_prev2", "first", "window1"))
            for r in records]  # fmt: skip
    np.testing.assert_allclose(sums, [r["ag_loss"] for r in records], rtol=1e-5)


def test_diagnostics_appear_on_log_steps(diag_run) -> None:
    workdir, _ = diag_run
    records = read_metrics(workdir)
    logged = [r for r in records if "loss" in r]
    assert logged and all("diag/mass/L1H3" in r for r in logged)
    assert not any("diag/mass/L0H0" in r for r in records if "loss" not in r)  # eval-only rows
    last = logged[-1]
    cells = [(layer, head) for layer in range(2) for head in range(4)]
    for layer, head in cells:
        assert 0.0 <= last[f"diag/mass/L{layer}H{head}"] <= 1.0 + 1e-6
        assert 0.0 <= last[f"diag/entropy/L{layer}H{head}"] <= math.log(32) + 1e-5
    guided = {(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)}
    for layer, head in cells:
        assert (f"diag/closest/L{layer}H{head}" in last) == ((layer, head) not in guided)
    assert last["diag/closest/L0H3"] in range(len(stats.BUILTIN))


def test_heat_maps_over_time(diag_run, tmp_path) -> None:
    workdir, _ = diag_run
    records = read_metrics(workdir)
    out = head_history.plot_history(records, tmp_path / "plots" / "heads.png", title="tiny")
    assert out == tmp_path / "plots" / "heads.png" and out.read_bytes().startswith(PNG)
    steps, mass = head_history.history(records, "mass")
    assert steps == [2, 4, 6, 8] and mass.shape == (4, 2, 4)
    logged = [r for r in records if "loss" in r]
    for t, record in enumerate(logged):
        for layer in range(2):
            for head in range(4):
                assert mass[t, layer, head] == record[f"diag/mass/L{layer}H{head}"]
    _, closest = head_history.history(records, "closest")
    assert np.isnan(closest[:, 1, :3]).all() and not np.isnan(closest[:, 1, 3]).any()


def test_heat_maps_need_diagnostics(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"train\.diagnostics=true"):
        head_history.plot_history([{"step": 1, "loss": 1.0}], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
