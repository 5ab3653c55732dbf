"""End-to-end runs of train_and_evaluate on the tiny config, and every bad input it must refuse."""

import copy
import fcntl
import json
import math
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from conftest import REPO, small_model, write_corpus
from guided_jax import sharding
from guided_jax.config import ConfigError, load_config
from guided_jax.model import EncoderForMLM
from guided_jax.train import loop as train_loop
from guided_jax.train import step as train_step_module
from guided_jax.train.loop import train_and_evaluate
from guided_jax.train.masking import max_predictions, mlm_loss
from guided_jax.train.metrics import read_metrics
from guided_jax.train.objective import selected_mlm_loss
from guided_jax.weights.workdir import read_run_config

ONE_DEVICE = jax.devices()[:1]

REQUIRED_KEYS = {
    "step",
    "loss",
    "mlm_loss",
    "ag_loss",
    "ag_weight",
    "learning_rate",
    "tokens_per_sec",
}


@pytest.mark.slow
def test_tiny_run_lowers_mlm_and_guidance_losses(tiny_config, tmp_path, capsys):
    cfg = tiny_config
    cfg.train.steps = 40
    cfg.train.learning_rate = 3e-3
    cfg.train.log_every = 5
    cfg.train.eval_every = 20
    workdir = tmp_path / "run"
    last = train_and_evaluate(cfg, workdir, devices=ONE_DEVICE)

    records = read_metrics(workdir)
    logged = [r for r in records if "mlm_loss" in r]
    evals = [r for r in records if "eval_mlm_loss" in r]
    assert [r["step"] for r in logged] == list(range(5, 41, 5))
    assert [r["step"] for r in evals] == [20, 40]
    assert all(set(r) >= REQUIRED_KEYS for r in logged)
    assert logged[-1]["mlm_loss"] < logged[0]["mlm_loss"] - 0.5
    # "first" is learnable from the <s> token alone; next/prev need position embeddings to
    # grow first, which takes a few hundred steps (the default job shows them converge).
    assert logged[-1]["ag_loss"] < 0.8 * logged[0]["ag_loss"]
    assert logged[-1]["ag_loss/first"] < 0.2 * logged[0]["ag_loss/first"]
    assert evals[-1]["eval_mlm_loss"] < evals[0]["eval_mlm_loss"]
    assert all(r["ag_weight"] == pytest.approx(100.0) for r in logged)
    # Per-pattern losses add up to the total.
    first = logged[0]
    parts = [v for k, v in first.items() if k.startswith("ag_loss/")]
    assert len(parts) == 3 and sum(parts) == pytest.approx(first["ag_loss"], rel=1e-5)
    assert last["step"] == 40
    assert (workdir / "checkpoints" / "40").is_dir()
    assert (workdir / "tokenizer" / "vocab.json").is_file()
    assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 40
    assert len(list((workdir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    # The compiled step's memory estimate is printed before training starts.
    assert re.search(r"train step memory per device: arguments [\d.]+ MiB", capsys.readouterr().out)


def test_baseline_trains_without_guidance_but_measures_it(tiny_config, tmp_path):
    tiny_config.guidance.enabled = False
    train_and_evaluate(tiny_config, tmp_path / "run", devices=ONE_DEVICE)
    records = read_metrics(tmp_path / "run")
    logged = [r for r in records if "mlm_loss" in r]
    assert all(r["ag_weight"] == 0.0 and r["ag_loss"] == 0.0 for r in logged)
    assert all(r["loss"] == pytest.approx(r["mlm_loss"]) for r in logged)
    assert all(r["eval_ag_loss"] > 0.0 for r in records if "eval_mlm_loss" in r)


def _without_timing(records):
    return [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in records]


def _copy_of_tiny_run(tiny_run, tmp_path):
    """A copy of the session's finished tiny run and the config it was trained with."""
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir)
    config = load_config(str(REPO / "configs" / "tiny.py"))
    config.data.train_files = read_run_config(tiny_run).data.train_files
    config.train.diagnostics = True  # as conftest's tiny_run
    return config, workdir


def test_rerun_resumes_from_last_checkpoint_identically(tiny_run, tmp_path):
    config, workdir = _copy_of_tiny_run(tiny_run, tmp_path)
    uninterrupted = read_metrics(tiny_run)
    # Lose the final checkpoint, as if the run had died after step 3's save.
    shutil.rmtree(workdir / "checkpoints" / "6")
    train_and_evaluate(config, workdir, devices=ONE_DEVICE)
    resumed = read_metrics(workdir)
    assert [r["step"] for r in resumed] == [2, 3, 4, 6]
    assert _without_timing(resumed) == _without_timing(uninterrupted)


def test_finished_run_is_not_repeated(tiny_run, tmp_path):
    config, workdir = _copy_of_tiny_run(tiny_run, tmp_path)
    before = (workdir / "metrics.jsonl").read_text()
    assert train_and_evaluate(config, workdir, devices=ONE_DEVICE) == {}
    assert (workdir / "metrics.jsonl").read_text() == before


def test_non_finite_loss_stops_without_saving_it(tiny_config, tmp_path):
    tiny_config.train.learning_rate = 1e38  # the first update overflows the parameters
    with pytest.raises(FloatingPointError, match=r"non-finite .* at step \d"):
        train_and_evaluate(tiny_config, tmp_path / "run", devices=ONE_DEVICE)
    assert not any((tmp_path / "run" / "checkpoints").glob("[0-9]*"))


# ----------------------------------------------------------------------------- shared reference


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted float32 run of the tiny config with every step logged, shared by the
    tests below (never modified: copy its workdir first). Its corpus is the same text as
    ``tiny_config``'s, so runs of that config compute exactly the same."""
    root = tmp_path_factory.mktemp("reference")
    config = load_config(str(REPO / "configs" / "tiny.py"))
    config.data.train_files = str(write_corpus(root / "corpus.txt"))
    config.train.log_every = 1
    workdir = root / "run"
    train_and_evaluate(config, workdir, devices=ONE_DEVICE)
    return config, workdir, read_metrics(workdir)


def _checkpoints(workdir) -> list[str]:
    """Every entry of WORKDIR/checkpoints (finished steps and any temporary leftovers)."""
    return sorted(p.name for p in (workdir / "checkpoints").iterdir())


def _assert_finite(records) -> None:
    for record in records:
        for key, value in record.items():
            assert value is not None and math.isfinite(value), (record["step"], key, value)


# ----------------------------------------------------------------------------- non-finite guard


def _poison_from(monkeypatch, bad_step: int) -> None:
    """From step index ``bad_step`` on, the train step sees NaN parameters (inside the
    compiled program, as a diverging run would)."""
    make_real = train_step_module.make_train_step

    def make_poisoned(*args, **kwargs):
        real_step = make_real(*args, **kwargs)

        def train_step(state, batch):
            params = jax.tree.map(
                lambda x: jnp.where(state.step >= bad_step, jnp.nan, x), state.params
            )
            return real_step(state.replace(params=params), batch)

        return train_step

    monkeypatch.setattr(train_step_module, "make_train_step", make_poisoned)


@pytest.mark.slow
def test_nan_stops_the_run_and_the_last_checkpoint_resumes(
    tiny_config, tmp_path, monkeypatch, reference
):
    _, _, want = reference
    cfg = tiny_config
    cfg.train.log_every = 1  # checkpoint_every=3, steps=6
    workdir = tmp_path / "run"
    with monkeypatch.context() as patch:
        _poison_from(patch, 4)  # the 5th step (index 4) computes with NaN parameters
        with pytest.raises(FloatingPointError, match=r"non-finite .*loss=nan.* at step 5\b"):
            train_and_evaluate(cfg, workdir, devices=ONE_DEVICE)
    # The last good checkpoint is complete when the error surfaces (the CLI exits right
    # after it, which would abandon a save still in flight).
    assert _checkpoints(workdir) == ["3"]
    crashed = read_metrics(workdir)
    assert [r["step"] for r in crashed] == [1, 2, 3, 4]  # the NaN record is not written
    _assert_finite(crashed)

    restored_steps = []
    restore_latest = train_loop.restore_latest

    def spy(manager, abstract_state, iterator):
        restored = restore_latest(manager, abstract_state, iterator)
        step, state, _, iterator_restored = restored
        assert iterator_restored
        restored_steps.append(step)
        assert all(jnp.isfinite(x).all() for x in jax.tree.leaves(state.params)), step
        return restored

    monkeypatch.setattr(train_loop, "restore_latest", spy)
    last = train_and_evaluate(cfg, workdir, devices=ONE_DEVICE)
    assert restored_steps == [3]
    assert last["step"] == 6 and _checkpoints(workdir) == ["3", "6"]
    records = read_metrics(workdir)
    _assert_finite(records)
    # Exactly what a run that never saw a NaN logs (record 4 is written again, identically).
    assert _without_timing(records) == _without_timing(want)


# ----------------------------------------------------------------------------- data guard


@pytest.mark.slow
def test_resume_on_a_grown_corpus_is_refused(tiny_config, tmp_path):
    workdir = tmp_path / "run"
    train_and_evaluate(tiny_config, workdir, devices=ONE_DEVICE)
    shutil.rmtree(workdir / "checkpoints" / "6")
    metrics_before = (workdir / "metrics.jsonl").read_text()
    corpus = tmp_path / "corpus.txt"
    extra = write_corpus(tmp_path / "extra.txt", lines=100, seed=1).read_text()
    corpus.write_text(corpus.read_text() + extra)

    with pytest.raises(ConfigError, match=r"num_blocks: \d+ -> \d+") as caught:
        train_and_evaluate(tiny_config, workdir, devices=ONE_DEVICE)
    assert "step 3" in str(caught.value)
    assert _checkpoints(workdir) == ["3"]
    assert (workdir / "metrics.jsonl").read_text() == metrics_before


# ----------------------------------------------------------------------------- grad accumulation


@pytest.mark.slow
def test_gradient_accumulation_trains(tiny_config, tmp_path, reference):
    _, _, want = reference
    cfg = tiny_config
    cfg.train.grad_accum_steps = 2  # two micro-batches of 2 rows per step of 4
    cfg.train.log_every = 1
    workdir = tmp_path / "run"
    last = train_and_evaluate(cfg, workdir, devices=ONE_DEVICE)
    assert last["step"] == 6
    records = read_metrics(workdir)
    _assert_finite(records)
    logged = [r for r in records if "mlm_loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert all(set(r) >= REQUIRED_KEYS | {"grad_norm"} for r in logged)
    # Micro-batches draw other masks than the whole batch, so the numbers differ a little,
    # but averaged (not summed) losses and gradients stay on the same scale.
    first, ref = logged[0], want[0]
    assert first["mlm_loss"] == pytest.approx(ref["mlm_loss"], rel=0.05)
    assert first["ag_loss"] == pytest.approx(ref["ag_loss"], rel=0.05)
    assert first["grad_norm"] == pytest.approx(ref["grad_norm"], rel=0.25)
    assert first["mlm_loss"] != ref["mlm_loss"]  # the accumulated step did run


def test_batch_not_divisible_by_grad_accum_is_refused_before_writing(tiny_config, tmp_path):
    tiny_config.train.grad_accum_steps = 3  # batch_size is 4
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"train\.grad_accum_steps=3"):
        train_and_evaluate(tiny_config, workdir, devices=ONE_DEVICE)
    assert not workdir.exists()


# ----------------------------------------------------------------------------- bfloat16


@pytest.mark.slow
def test_bfloat16_run_matches_float32_closely(tiny_config, tmp_path, reference):
    _, _, want = reference
    tiny_config.model.dtype = "bfloat16"
    tiny_config.train.log_every = 1
    workdir = tmp_path / "run"
    train_and_evaluate(tiny_config, workdir, devices=ONE_DEVICE)
    records = read_metrics(workdir)
    _assert_finite(records)
    logged = [r for r in records if "mlm_loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert logged[0]["mlm_loss"] == pytest.approx(want[0]["mlm_loss"], rel=0.02)
    assert logged[0]["mlm_loss"] != want[0]["mlm_loss"]  # computed in bfloat16 indeed


# ----------------------------------------------------------------------------- flash attention


@pytest.mark.slow
def test_flash_attention_run_trains_like_dense(tiny_config, tmp_path, reference):
    _, _, want = reference
    tiny_config.model.attention = "flash"
    tiny_config.train.log_every = 1
    workdir = tmp_path / "run"
    train_and_evaluate(tiny_config, workdir, devices=ONE_DEVICE)
    logged = [r for r in read_metrics(workdir) if "mlm_loss" in r]
    _assert_finite(logged)
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    # Same masks and weights; only the attention-dropout draws differ (drawn per key block).
    for key in ("mlm_loss", "ag_loss"):
        assert logged[0][key] == pytest.approx(want[0][key], rel=0.05), key
    assert logged[0]["ag_loss"] != want[0]["ag_loss"]
    assert logged[-1]["ag_loss"] < logged[0]["ag_loss"]


# ----------------------------------------------------------------------------- workdir config


@pytest.mark.slow
def test_resume_accepts_a_new_layout_but_not_a_new_config(tmp_path, reference):
    config, ref_workdir, want = reference
    workdir = tmp_path / "run"
    shutil.copytree(ref_workdir, workdir)
    shutil.rmtree(workdir / "checkpoints" / "6")

    relaid = copy.deepcopy(config)
    relaid.mesh.update(data=1, fsdp=-1, rules="embed:fsdp")
    relaid.model.remat = "full"
    last = train_and_evaluate(relaid, workdir, devices=ONE_DEVICE)
    assert last["step"] == 6 and _checkpoints(workdir) == ["3", "6"]
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == [r["step"] for r in want]
    for got, ref in zip(_without_timing(records), _without_timing(want), strict=True):
        assert got == pytest.approx(ref, rel=1e-5), got["step"]

    shutil.rmtree(workdir / "checkpoints" / "6")
    before = (workdir / "metrics.jsonl").read_text()
    changed = copy.deepcopy(relaid)
    changed.train.learning_rate = 2e-3
    with pytest.raises(ConfigError, match=r"train\.learning_rate: 0\.001 -> 0\.002"):
        train_and_evaluate(changed, workdir, devices=ONE_DEVICE)
    assert _checkpoints(workdir) == ["3"]
    assert (workdir / "metrics.jsonl").read_text() == before


def test_a_second_run_on_the_same_workdir_is_refused(tiny_config, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    with open(workdir / ".lock", "w") as held:
        held.write("pid 12345 on elsewhere\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running training process does
        with pytest.raises(ConfigError, match=r"in use by another run \(pid 12345 on elsewhere\)"):
            train_and_evaluate(tiny_config, workdir, devices=ONE_DEVICE)
    assert not (workdir / "checkpoints").exists()
    train_and_evaluate(tiny_config, workdir, devices=ONE_DEVICE)  # free again: runs
    assert (workdir / "checkpoints" / "6").is_dir()


# ----------------------------------------------------------------------------- MLM head


@pytest.mark.parametrize("shards", [1, 8])  # one group of all rows; a group per device
@pytest.mark.parametrize("probability", [0.15, 0.9])  # within the bound; a fuller shard
def test_head_on_selected_positions_gives_the_full_loss_and_gradients(probability, shards):
    config = small_model(vocab_size=64, hidden_size=32, num_layers=1, max_position_embeddings=80)
    model = EncoderForMLM(config, rngs=nnx.Rngs(0))
    keys = jax.random.split(jax.random.key(1), 3)
    hidden = jax.random.normal(keys[0], (8, 64, 32))
    labels = jax.random.randint(keys[1], (8, 64), 0, 64)
    selected = jax.random.bernoulli(keys[2], probability, (8, 64))
    assert max_predictions(64, 0.15) < 64
    mesh = jax.make_mesh(
        (shards, 1, 1),
        sharding.MESH_AXES,
        axis_types=(AxisType.Auto,) * 3,
        devices=jax.devices()[:shards],
    )

    def selected_only(h):
        assert sharding.batch_shards(h.shape[0]) == shards
        return selected_mlm_loss(model, h, labels, selected, 0.15)

    def every_position(h):
        return mlm_loss(model.logits(h), labels, selected)

    with jax.set_mesh(mesh):
        rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
        got, got_grad = jax.jit(jax.value_and_grad(selected_only))(jax.device_put(hidden, rows))
    want, want_grad = jax.value_and_grad(every_position)(hidden)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    np.testing.assert_allclose(got_grad, want_grad, atol=1e-7)


def test_full_head_fallback_never_holds_every_rows_logits():
    # The compiled step reserves memory for the cond's rare branch too: it must take the
    # vocabulary projection a row at a time, not [B, n, V] at once.
    rows, n, vocab = 8, 128, 4096
    config = small_model(
        vocab_size=vocab, hidden_size=32, num_layers=1, max_position_embeddings=n + 2
    )
    model = EncoderForMLM(config, rngs=nnx.Rngs(0))
    hidden = jax.ShapeDtypeStruct((rows, n, 32), jnp.float32)
    labels = jax.ShapeDtypeStruct((rows, n), jnp.int32)
    selected = jax.ShapeDtypeStruct((rows, n), jnp.bool_)

    def loss(h, labels, selected):
        return selected_mlm_loss(model, h, labels, selected, 0.15)

    compiled = jax.jit(jax.grad(loss)).lower(hidden, labels, selected).compile()
    every_rows_logits = rows * n * vocab * 4
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < every_rows_logits, (temp, every_rows_logits)  # all rows at once: 2.3x
