"""The pretraining objective against the reference's formulas, each computed here on its own:
the loss a train step reports (MLM + weight x AG, AG the sum of its groups), the AG weight
schedule over a real run, the maps the guidance loss sees with attention dropout, token-set
targets read from the masked input, and the MLM noise's exact proportions."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import small_model
from guided_jax.guidance import HeadSpec
from guided_jax.kernels.dense import dense_attention
from guided_jax.kernels.dropout import keep_mask
from guided_jax.model import EncoderForMLM
from guided_jax.train.loop import train_and_evaluate
from guided_jax.train.masking import mask_tokens
from guided_jax.train.metrics import read_metrics
from guided_jax.train.objective import Objective, mlm_forward
from guided_jax.train.step import TrainState, make_train_step

PAD, MASK = 1, 4
SPECIALS = (0, 1, 2, 3, 4)  # <s>, <pad>, </s>, <unk>, <mask>
TOKEN = 7  # the token-set group's token


def _reference_weight(step: int, scale: float, stagnant: int, total: int) -> float:
    """The reference trainer's AG weight at ``step`` (docs/DESIGN.md §1)."""
    return scale * (1.0 if step < stagnant else max(0.0, (total - step) / max(1, total - stagnant)))


def _model(seed: int = 0, dropout: float = 0.0) -> EncoderForMLM:
    config = small_model(
        dropout=dropout,
        attention_dropout=dropout,
        initializer_range=0.2,  # attention far from uniform
    )
    return EncoderForMLM(config, rngs=nnx.Rngs(seed))


def _objective(spec: str, **changes) -> Objective:
    values = dict(
        vocab_size=40,
        mask_id=MASK,
        special_ids=SPECIALS,
        pad_id=PAD,
        mlm_probability=0.15,
        spec=HeadSpec.parse(spec),
        token_ids=(TOKEN,),
        guided=True,
        after_dropout=True,
        scale=3.7,
        stagnant_steps=5,
        total_steps=12,
    )
    return Objective(**{**values, **changes})


def _batch(rows: int = 4, n: int = 20, seed: int = 0) -> np.ndarray:
    """``<s> ids </s> <pad>...`` with the token-set token at many positions."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 40, size=(rows, n)).astype(np.int32)
    ids[:, ::3] = TOKEN
    ids[:, 0], ids[:, -1] = 0, 2
    ids[-1, -4:] = PAD
    ids[-1, -5] = 2
    return ids


# ----------------------------------------------------------------------------- (a) loss


@pytest.fixture(scope="module")
def guided_step():
    """One compiled train step of a guided tiny model (with dropout) and its initial state."""
    objective = _objective("next:1,first:1,token[7]:1")
    graphdef, params = nnx.split(_model(dropout=0.1))
    tx = optax.adamw(1e-3)
    step = jax.jit(make_train_step(objective, graphdef, tx, optax.constant_schedule(1e-3)))
    rng = jax.random.key_data(jax.random.key(3))
    return step, TrainState(jnp.zeros((), jnp.int32), rng, params, tx.init(params))


@pytest.mark.parametrize("state_step", [0, 4, 5, 8, 11, 12, 15])
def test_step_reports_mlm_plus_weighted_guidance(guided_step, state_step):
    step, state = guided_step
    state = state.replace(step=jnp.asarray(state_step, jnp.int32))
    _, metrics = step(state, jnp.asarray(_batch()))
    m = {k: float(v) for k, v in metrics.items()}
    groups = {k: v for k, v in m.items() if k.startswith("ag_loss/")}
    assert set(groups) == {"ag_loss/next", "ag_loss/first", "ag_loss/token[7]"}
    assert all(v > 0 for v in groups.values()) and m["mlm_loss"] > 0
    assert m["ag_loss"] == pytest.approx(sum(groups.values()), rel=1e-6)
    weight = _reference_weight(state_step, 3.7, 5, 12)
    assert m["ag_weight"] == pytest.approx(weight, rel=1e-6)
    assert m["loss"] == pytest.approx(m["mlm_loss"] + weight * m["ag_loss"], rel=1e-6)
    if weight:  # the weight matters: an unweighted sum would be far off
        assert abs(m["loss"] - (m["mlm_loss"] + m["ag_loss"])) > 1e-3 * m["loss"]


# ----------------------------------------------------------------------------- (b) schedule


@pytest.mark.slow
def test_logged_ag_weight_follows_the_reference_schedule(tiny_config, tmp_path):
    cfg = tiny_config
    cfg.guidance.heads = "next:1,token[</s>]:1,token[.]:1"
    cfg.guidance.stagnant_steps = 3
    cfg.train.update(steps=8, log_every=1, eval_every=4, checkpoint_every=8)
    last = train_and_evaluate(cfg, tmp_path / "run", devices=jax.devices()[:1])
    logged = [r for r in read_metrics(tmp_path / "run") if "ag_weight" in r]
    assert [r["step"] for r in logged] == list(range(1, 9))
    for record in logged:
        # The record of step s holds the update made from state.step = s - 1.
        want = _reference_weight(record["step"] - 1, cfg.guidance.scale, 3, 8)
        assert record["ag_weight"] == pytest.approx(want, rel=1e-6), record["step"]
        total = record["mlm_loss"] + record["ag_weight"] * record["ag_loss"]
        assert record["loss"] == pytest.approx(total, rel=1e-5), record["step"]
    assert [r["ag_weight"] for r in logged][-5:] == pytest.approx([100, 80, 60, 40, 20])
    # Token-set groups train and are reported.
    assert {"ag_loss/next", "ag_loss/token[</s>]", "ag_loss/token[.]"} <= set(last)
    assert last["ag_loss/token[.]"] > 0.0


# ----------------------------------------------------------------------------- (c) dropout


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _square_sums(maps: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Σ (A - P)² per head for the spec "next:1,first:1,token[7]:1" over 4 heads (head 3
    unguided), with dense targets as the reference builds them."""
    batch, heads, n, _ = maps.shape
    targets = np.zeros((batch, heads, n, n))
    targets[:, 0] = np.eye(n, k=1)
    targets[:, 1, :, 0] = 1.0
    targets[:, 2] = (ids == TOKEN)[:, None, :]
    sums = ((maps - targets) ** 2).sum(axis=(0, 2, 3))
    sums[3] = 0.0
    return sums


def _attention_case(n: int = 10):
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(key, (2, n, 4, 8)) for key in keys[:3])
    ids = np.array(jax.random.randint(keys[3], (2, n), 5, 12))
    ids[:, ::4] = TOKEN
    key_mask = np.arange(n)[None, :] < np.array([[n], [n - 3]])
    bias = np.where(key_mask, 0.0, -1e30)[:, None, None, :]
    scores = np.einsum("bqhd,bkhd->bhqk", np.float64(q), np.float64(k)) / np.sqrt(8)
    return q, k, v, ids, key_mask, _softmax(scores + bias)


@pytest.mark.parametrize("after_dropout", [True, False])
def test_guidance_sees_the_maps_that_multiply_the_values(after_dropout):
    q, k, v, ids, key_mask, probs = _attention_case()
    rate, key = 0.25, jax.random.key(42)
    token_masks = jnp.asarray(ids == TOKEN, jnp.float32)[None]
    values, sums = dense_attention(
        q,
        k,
        v,
        jnp.asarray(key_mask),
        spec=HeadSpec.parse("next:1,first:1,token[7]:1"),
        token_masks=token_masks,
        dropout_rate=rate,
        dropout_key=key,
        after_dropout=after_dropout,
    )
    keep = np.asarray(keep_mask(key, rate, probs.shape))
    assert 0.65 < keep.mean() < 0.85  # dropout did drop
    dropped = probs * keep / (1 - rate)
    want_values = np.einsum("bhqk,bkhd->bqhd", dropped, np.float64(v))
    np.testing.assert_allclose(values, want_values, rtol=1e-5, atol=1e-6)
    want_sums = _square_sums(dropped if after_dropout else probs, ids)
    np.testing.assert_allclose(sums, want_sums, rtol=1e-5)
    other = _square_sums(probs if after_dropout else dropped, ids)
    assert not np.allclose(sums[:3], other[:3], rtol=1e-3)  # the choice shows


# ----------------------------------------------------------------------------- (d) token sets


def test_token_set_targets_come_from_the_masked_input():
    objective = _objective(
        "token[7]:1,next:1", mlm_probability=0.5, token_ids=(TOKEN,), stagnant_steps=20000
    )
    graphdef, params = nnx.split(_model(seed=1))
    batch = jnp.asarray(_batch(seed=2))
    mask_key = jax.random.key(5)

    @jax.jit
    def forward(params, batch, key):
        model = nnx.merge(graphdef, params)
        return mlm_forward(objective, model, batch, key, guided=True)

    @jax.jit
    def attention_maps(params, ids, attend):
        _, aux = nnx.merge(graphdef, params)(ids, attention_mask=attend, return_attentions=True)
        return aux["attentions"]

    _, groups, _ = forward(params, batch, mask_key)
    masked, _ = mask_tokens(
        mask_key,
        batch,
        vocab_size=40,
        mask_id=MASK,
        special_ids=SPECIALS,
        mlm_probability=0.5,
    )
    masked, ids = np.asarray(masked), np.asarray(batch)
    assert ((ids == TOKEN) & (masked != TOKEN)).sum() > 3  # masking replaced some of them
    maps = attention_maps(params, jnp.asarray(masked), jnp.asarray(ids != PAD))
    maps = [np.asarray(a, np.float64) for a in maps]  # [B, H, n, n] per layer

    def reference(token_ids: np.ndarray) -> np.ndarray:
        """Σ over layers of the MSE of each group (mean over B x heads x n x n, pads too)."""
        n = token_ids.shape[1]
        token_target = np.broadcast_to((token_ids == TOKEN)[:, None, None, :], (len(ids), 1, n, n))
        next_target = np.eye(n, k=1)[None, None]
        return np.array(
            [
                sum(np.mean((a[:, 0:1] - token_target) ** 2) for a in maps),
                sum(np.mean((a[:, 1:2] - next_target) ** 2) for a in maps),
            ]
        )

    np.testing.assert_allclose(groups, reference(masked), rtol=1e-5)
    assert not np.isclose(groups[0], reference(ids)[0], rtol=1e-3)  # unmasked ids differ


# ----------------------------------------------------------------------------- (e) MLM noise


def test_mlm_noise_proportions_on_a_million_selected_tokens():
    vocab = 50_000
    rng = np.random.default_rng(0)
    ids = rng.integers(5, vocab, size=(2048, 4096)).astype(np.int32)
    ids[:, ::20] = rng.choice(np.asarray(SPECIALS, np.int32), size=ids[:, ::20].shape)
    masked, selected = jax.jit(
        functools.partial(mask_tokens, vocab_size=vocab, mask_id=MASK, special_ids=SPECIALS)
    )(jax.random.key(11), jnp.asarray(ids))
    masked, selected = np.asarray(masked), np.asarray(selected)
    special = np.isin(ids, SPECIALS)
    assert special.sum() > 400_000 and not selected[special].any()
    np.testing.assert_array_equal(masked[~selected], ids[~selected])

    def within(count: int, total: int, p: float) -> bool:
        return abs(count - total * p) <= 5 * np.sqrt(total * p * (1 - p))

    candidates = int((~special).sum())
    chosen = int(selected.sum())
    assert chosen >= 1_000_000
    assert within(chosen, candidates, 0.15), chosen / candidates
    original, new = ids[selected], masked[selected]
    to_mask = int((new == MASK).sum())
    unchanged = int((new == original).sum())
    random = chosen - to_mask - unchanged
    # A random replacement is <mask> or the original word with probability 1/V each.
    assert within(to_mask, chosen, 0.8 + 0.1 / vocab), to_mask / chosen
    assert within(unchanged, chosen, 0.1 + 0.1 / vocab), unchanged / chosen
    assert within(random, chosen, 0.1 * (1 - 2 / vocab)), random / chosen


# ----------------------------------------------------------------------------- (e) MLM targets


@pytest.mark.parametrize(("targets", "maskable"), [("no_specials", ()), ("reference", (3, 4))])
def test_mlm_targets_choose_which_special_tokens_are_predicted(tiny_config, targets, maskable):
    """data.mlm_targets=reference: <unk> (3) and <mask> (4) in the text are selected at the MLM
    rate like words, as by the reference's collator; <s>, </s> and pad never are."""
    tiny_config.data.mlm_targets = targets
    objective = Objective.from_config(
        tiny_config,
        vocab_size=40,
        mask_id=MASK,
        special_ids=SPECIALS,
        pad_id=PAD,
        spec=None,
        token_ids=(),
    )
    ids = np.tile(np.array([0, 3, 4, 9, 1, 2], np.int32), (512, 1))
    _, selected = objective.mask(jax.random.key(0), jnp.asarray(ids))
    rate = np.asarray(selected).mean(axis=0)
    for position, token in enumerate(ids[0]):
        if token == 9 or token in maskable:
            assert abs(rate[position] - 0.15) < 0.05, (token, rate[position])
        else:
            assert rate[position] == 0.0, (token, rate[position])
