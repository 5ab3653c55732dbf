"""Document-boundary attention masks (data.document_masks): recorded starts, segment ids, the
masks in the dense and flash kernels, and whole runs with them."""

from __future__ import annotations

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_runs_match, small_model
from guided_jax.config import ConfigError, check_config
from guided_jax.data import pipeline, token_cache
from guided_jax.data.packing import BlockPacker
from guided_jax.data.text import CorpusError
from guided_jax.data.tokenizer import train_tokenizer
from guided_jax.guidance import Guide, HeadSpec, losses_from_head_sums, token_masks
from guided_jax.kernels import segments as documents
from guided_jax.kernels.dense import dense_attention
from guided_jax.kernels.flash import flash_attention
from guided_jax.model import EncoderForMLM
from guided_jax.model.attention import layer_attention
from guided_jax.train.inputs import prepare
from guided_jax.train.loop import train_and_evaluate
from guided_jax.train.metrics import read_metrics
from guided_jax.train.objective import split_batch

ONE_DEVICE = jax.devices()[:1]


# ----------------------------------------------------------------------------- packing


def test_packing_records_where_each_document_starts():
    docs = [[10, 11, 12], [20, 21], [], [30, 31, 32, 33, 34], [40]]
    blocks, starts = BlockPacker(6, bos_id=0, eos_id=2, starts=True).add(docs)
    assert starts.shape == blocks.shape and starts.dtype == np.uint8
    # Blocks of 4 text tokens: 10 11 12 20 | 21 30 31 32 | (33 34 40 dropped).
    np.testing.assert_array_equal(blocks, [[0, 10, 11, 12, 20, 2], [0, 21, 30, 31, 32, 2]])
    np.testing.assert_array_equal(starts, [[0, 1, 0, 0, 1, 0], [0, 0, 1, 0, 0, 0]])


def test_streamed_cache_records_the_same_starts(tmp_path, monkeypatch):
    docs = [f"Document {i} says {'word ' * (i % 7)}." for i in range(60)]
    tokenizer = train_tokenizer(docs, 300, tmp_path / "tok")
    monkeypatch.setattr(token_cache, "_CHUNK_DOCUMENTS", 7)  # many chunk boundaries
    blocks = token_cache.build(
        docs, tokenizer, 16, tmp_path / "entry", {}, total=len(docs), document_starts=True
    )
    starts = token_cache.load_starts(tmp_path / "entry")
    assert isinstance(starts, np.memmap) and starts.shape == blocks.shape
    ids = tokenizer.encode_batch([d + "\n" for d in docs])
    want_blocks, want_starts = BlockPacker(16, tokenizer.bos_id, tokenizer.eos_id, starts=True).add(
        ids
    )
    np.testing.assert_array_equal(starts, want_starts)
    np.testing.assert_array_equal(blocks, want_blocks)
    # Each recorded start is the first token of a document: "Document" after a newline.
    first = tokenizer.encode_batch(["Document"])[0][0]
    assert (blocks[starts == 1] == first).all() and starts.sum() > len(blocks)
    # An entry built without them has none (and no file for them).
    token_cache.build(docs, tokenizer, 16, tmp_path / "plain", {})
    assert token_cache.load_starts(tmp_path / "plain") is None
    assert not (tmp_path / "plain" / token_cache.STARTS_FILE).exists()
    (tmp_path / "entry" / token_cache.STARTS_FILE).write_bytes(b"\1")
    with pytest.raises(CorpusError, match=r"damaged.*starts\.bin"):
        token_cache.load_starts(tmp_path / "entry")


def test_segment_ids_number_documents_and_share_bos_and_eos():
    starts = jnp.array([[1, 0, 0, 1, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0]], jnp.uint8)
    np.testing.assert_array_equal(
        documents.segment_ids(starts), [[0, 1, 1, 2, 2, 3, 0], [0, 1, 1, 1, 1, 1, 0]]
    )
    seen = documents.visible(jnp.array([[0, 1, 2, 0]]), jnp.array([[0, 1, 2, 0]]))[0]
    np.testing.assert_array_equal(seen, [[1, 1, 1, 1], [1, 1, 0, 1], [1, 0, 1, 1], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match=r"\[B, 2, n\].*\(2, 3, 4\)"):
        split_batch(jnp.zeros((2, 3, 4), jnp.int32))


# ----------------------------------------------------------------------------- kernels

SPEC = HeadSpec.parse("self:1,next:1,prev:1,first:1,token[7]:1")


def _attention_inputs(n: int = 21, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 5)
    q, k, v = (jax.random.normal(key, (2, n, 6, 8)) for key in keys[:3])
    ids = jax.random.randint(keys[3], (2, n), 0, 12)
    starts = jax.random.bernoulli(keys[4], 0.2, (2, n)).astype(jnp.int32)
    key_mask = jnp.arange(n)[None, :] < jnp.array([[n], [n - 3]])  # padding too
    return q, k, v, key_mask, token_masks(ids, [7]), documents.segment_ids(starts)


def test_flash_equals_dense_with_segments_in_values_losses_and_gradients():
    q, k, v, key_mask, masks, segments = _attention_inputs()
    cotangent = jax.random.normal(jax.random.key(9), q.shape)

    def kernel_losses(kernel, **options):
        def attend(q, k, v, segment_ids):
            out, head_sums = kernel(
                q, k, v, key_mask, spec=SPEC, token_masks=masks, segment_ids=segment_ids, **options
            )
            return out, losses_from_head_sums(head_sums, SPEC, q.shape[0], q.shape[1])

        return attend

    dense = kernel_losses(dense_attention)
    flash = kernel_losses(flash_attention, block=8)  # blocks of 8 over 21 keys: one padded

    def run(kernel, segment_ids):
        def objective(q, k, v):
            out, losses = kernel(q, k, v, segment_ids)
            return jnp.sum(out * cotangent) + 3.0 * jnp.sum(losses), (out, losses)

        (_, aux), grads = jax.value_and_grad(objective, (0, 1, 2), has_aux=True)(q, k, v)
        return (*aux, *grads)

    want = run(dense, segments)
    got = run(flash, segments)
    for name, a, b in zip(("out", "losses", "dq", "dk", "dv"), got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
    # The masks matter: without segments the values differ.
    assert not np.allclose(run(dense, None)[0], want[0], atol=1e-3)


def test_flash_layer_passes_segments_and_pallas_refuses_them():
    q, k, v, key_mask, masks, segments = _attention_inputs(n=12)
    options = dict(dropout_rate=0.0, dropout_key=None, guide=Guide(SPEC, masks))
    want, want_losses = layer_attention("dense", q, k, v, key_mask, segment_ids=segments, **options)
    out, losses = layer_attention("flash", q, k, v, key_mask, segment_ids=segments, **options)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"pallas.*per-document.*document_masks=false"):
        layer_attention("pallas", q, k, v, key_mask, segment_ids=segments, **options)


@pytest.mark.parametrize("attention", ["dense", "flash"])
def test_attention_maps_are_zero_across_documents_but_not_at_bos_and_eos(attention):
    config = small_model(
        vocab_size=50,
        num_heads=2,
        max_position_embeddings=40,
        attention=attention,
        initializer_range=0.2,  # attention far from uniform, so the masks show
    )
    model = EncoderForMLM(config, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (2, 12), 3, 50)
    starts = jnp.zeros((2, 12), jnp.int32).at[0, 4].set(1).at[0, 8].set(1).at[1, 6].set(1)
    segments = documents.segment_ids(starts)
    logits, aux = model(ids, segment_ids=segments, return_attentions=True)
    seen = np.asarray(documents.visible(segments, segments))[:, None]  # [B, 1, n, n]
    for maps in aux["attentions"]:
        maps = np.asarray(maps)
        assert (maps[np.broadcast_to(~seen, maps.shape)] == 0).all()
        assert (maps[np.broadcast_to(seen, maps.shape)] > 0).all()  # bos/eos see everything
        np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)
    # The encoder's output respects the same masks: the maps above are what it used.
    dense_model = EncoderForMLM(dataclasses.replace(config, attention="dense"), rngs=nnx.Rngs(0))
    want, _ = dense_model(ids, segment_ids=segments)
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
    plain, _ = dense_model(ids)
    assert not np.allclose(plain, want, atol=1e-3)


# ----------------------------------------------------------------------------- runs


def test_pipeline_batches_carry_starts_and_shard_by_rows():
    blocks = np.repeat(np.arange(16, dtype=np.int32)[:, None], 5, axis=1)
    starts = (blocks % 3 == 0).astype(np.uint8)
    source = pipeline.examples(blocks, starts)
    whole = pipeline.batch_dataset(source, 8, seed=3)
    plain = pipeline.batch_dataset(blocks, 8, seed=3)
    halves = [
        pipeline.batch_dataset(source, 8, seed=3, rows=slice(i * 4, i * 4 + 4)) for i in (0, 1)
    ]
    for step in range(5):
        batch = whole[step]
        assert batch.shape == (8, 2, 5) and batch.dtype == np.int32
        np.testing.assert_array_equal(batch[:, 0], plain[step])  # the same blocks, same order
        np.testing.assert_array_equal(batch[:, 1], batch[:, 0] % 3 == 0)
        np.testing.assert_array_equal(np.concatenate([h[step] for h in halves]), batch)
    with pytest.raises(ValueError, match="do not match"):
        pipeline.examples(blocks, starts[:, :4])


def test_cache_entries_with_and_without_starts(tiny_config, tmp_path):
    plain = prepare(tiny_config, tmp_path / "run")
    assert plain.train_starts is None and plain.eval_starts is None
    tiny_config.data.document_masks = True
    tiny_config.data.cache_dir = str(tmp_path / "run" / "token_cache")
    masked = prepare(tiny_config, tmp_path / "masked")
    assert len(list((tmp_path / "run" / "token_cache").iterdir())) == 2  # its own entry
    np.testing.assert_array_equal(masked.train_blocks, plain.train_blocks)
    assert masked.train_starts.shape == masked.train_blocks.shape
    assert masked.eval_starts.shape == masked.eval_blocks.shape
    assert masked.train_starts[:, 1:-1].sum() > 0
    # A cache: source without starts is refused when masks are on, and pallas is refused.
    (entry,) = [
        p
        for p in (tmp_path / "run" / "token_cache").iterdir()
        if token_cache.load_starts(p) is None
    ]
    tiny_config.data.train_files = f"cache:{entry}"
    tiny_config.data.tokenizer_dir = str(tmp_path / "run" / "tokenizer")
    with pytest.raises(ConfigError, match="records no document starts"):
        prepare(tiny_config, tmp_path / "reuse")
    tiny_config.model.attention = "pallas"
    tiny_config.model.attention_dropout = 0.0
    with pytest.raises(ConfigError, match=r"document_masks.*pallas"):
        check_config(tiny_config)


@pytest.mark.slow
def test_run_with_document_masks_trains_and_resumes_identically(tiny_config, tmp_path):
    tiny_config.data.document_masks = True
    tiny_config.train.diagnostics = True
    tiny_config.train.grad_accum_steps = 2  # splits [B, 2, n] batches
    workdir = tmp_path / "run"
    train_and_evaluate(tiny_config, workdir, devices=ONE_DEVICE)
    records = read_metrics(workdir)
    logged = [r for r in records if "mlm_loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6]
    evals = [r["eval_mlm_loss"] for r in records if "eval_mlm_loss" in r]
    assert len(evals) == 2 and np.isfinite(evals).all()
    assert all(np.isfinite(r["loss"]) and "diag/mass/L0H0" in r for r in logged)
    assert logged[-1]["ag_loss"] < logged[0]["ag_loss"]
    # Resume after losing the last checkpoint: the same metrics and parameters.
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    train_and_evaluate(tiny_config, resumed, devices=ONE_DEVICE)
    assert_runs_match(workdir, resumed, rtol=1e-6, step=6)
