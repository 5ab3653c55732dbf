"""Tests for guided_jax.guidance: the AG loss against an independent dense implementation of the
reference formula, its gradient, head-spec parsing and errors, and the guidance weight schedule.

The dense reference below builds the ``n x n`` targets exactly as docs/DESIGN.md §1 describes them
and takes ``mean((A[:, heads_g] - P_g) ** 2)`` in float64; it does not use the package's spec
objects (each case states its head assignment by hand), so it checks the head assignment too.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guided_jax.guidance import (
    Guide,
    HeadSpec,
    PatternGroup,
    SpecError,
    group_losses,
    guidance_loss,
    guidance_weight,
    head_square_sums,
    token_masks,
)

# ----------------------------------------------------------------------------- dense reference

B, H, N = 3, 8, 13  # n deliberately not a power of two
S_ID, EOS_ID, DOT_ID, NEVER_ID = 0, 2, 7, 9  # token ids used by the token-set cases


def dense_target(pattern: str, n: int, input_ids: np.ndarray, token_id: int | None) -> np.ndarray:
    """``[B, n, n]`` float64 target of one pattern, written out entry by entry."""
    batch = input_ids.shape[0]
    target = np.zeros((batch, n, n))
    for b in range(batch):
        for i in range(n):
            for j in range(n):
                if pattern == "self":
                    one = j == i
                elif pattern == "next":
                    one = j == i + 1  # the last row has no j = n, so it stays all zero
                elif pattern == "prev":
                    one = j == i - 1  # the first row has no j = -1, so it stays all zero
                elif pattern == "first":
                    one = j == 0
                elif pattern == "token":
                    one = input_ids[b, j] == token_id  # same in every row, per example
                else:
                    raise AssertionError(pattern)
                target[b, i, j] = float(one)
    return target


def dense_loss_and_grad(
    attentions: list[np.ndarray],
    groups: list[tuple[str, list[int], int | None]],
    start_layer: int,
    input_ids: np.ndarray,
    start_layer_groups: str = "all",
) -> tuple[float, list[np.ndarray]]:
    """Reference loss ``sum_l sum_g mean((A[l][:, heads_g] - P_g)^2)`` and its gradient; below
    ``start_layer`` no group counts, or with ``start_layer_groups="tokens"`` (the reference's
    probing code) every group but the token sets."""
    total = 0.0
    grads = [np.zeros(a.shape, np.float64) for a in attentions]
    for layer, attention in enumerate(attentions):
        a = attention.astype(np.float64)
        n = a.shape[-1]
        for pattern, heads, token_id in groups:
            if layer < start_layer and (start_layer_groups == "all" or pattern == "token"):
                continue
            target = dense_target(pattern, n, input_ids, token_id)[:, None]  # [B, 1, n, n]
            diff = a[:, heads] - target
            total += np.mean(diff**2)
            grads[layer][:, heads] = 2.0 * diff / diff.size
    return total, grads


def random_attention(rng: np.random.Generator, layers: int, shape=(B, H, N, N)) -> list:
    """Post-softmax float32 maps with a mix of flat and peaked rows."""
    out = []
    for _ in range(layers):
        logits = rng.normal(size=shape) * rng.uniform(0.5, 4.0, size=(*shape[:-1], 1))
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        out.append((probs / probs.sum(-1, keepdims=True)).astype(np.float32))
    return out


def example_ids(rng: np.random.Generator) -> np.ndarray:
    """``[B, N]`` ids: example 0 has no '.', example 1 has many, no example has NEVER_ID."""
    ids = rng.integers(10, 50, size=(B, N))
    ids[:, 0] = S_ID
    ids[:, -1] = EOS_ID
    ids[1, 2:11] = DOT_ID  # many occurrences
    ids[2, 5] = DOT_ID  # one occurrence
    ids[2, 8] = EOS_ID  # </s> twice in example 2
    assert not (ids[0] == DOT_ID).any() and not (ids == NEVER_ID).any()
    return ids


# (spec text, tokens, start layer, hand-written head assignment, number of layers)
CASES = {
    "self": ("1,0,0,0", (), 0, [("self", [0], None)], 1),
    "next": ("0,1,0,0", (), 0, [("next", [0], None)], 1),
    "prev": ("0,0,1,0", (), 0, [("prev", [0], None)], 1),
    "first": ("0,0,0,1", (), 0, [("first", [0], None)], 1),
    "reference_0114": (
        "0,1,1,4",
        (),
        0,
        [("next", [0], None), ("prev", [1], None), ("first", [2, 3, 4, 5], None)],
        2,
    ),
    "uneven_1203_start1": (
        "1,2,0,3",
        (),
        1,
        [("self", [0], None), ("next", [1, 2], None), ("first", [3, 4, 5], None)],
        3,
    ),
    "all_four_start2": (
        "2,1,1,3",
        (),
        2,
        [
            ("self", [0, 1], None),
            ("next", [2], None),
            ("prev", [3], None),
            ("first", [4, 5, 6], None),
        ],
        4,
    ),
    "probing_tokens": (
        "0,1,1,0,3,3",
        ("<s>", "</s>"),
        0,
        [
            ("next", [0], None),
            ("prev", [1], None),
            ("token", [2, 3, 4], S_ID),
            ("token", [5, 6, 7], EOS_ID),
        ],
        2,
    ),
    "everything_start1": (
        "1,1,1,1,2,1",
        (".", "<never>"),
        1,
        [
            ("self", [0], None),
            ("next", [1], None),
            ("prev", [2], None),
            ("first", [3], None),
            ("token", [4, 5], DOT_ID),
            ("token", [6], NEVER_ID),
        ],
        2,
    ),
    "token_sparse_dense_absent_start1": (
        "0,0,1,1,2,1,1",
        (".", "</s>", "<never>"),
        1,
        [
            ("prev", [0], None),
            ("first", [1], None),
            ("token", [2, 3], DOT_ID),
            ("token", [4], EOS_ID),
            ("token", [5], NEVER_ID),
        ],
        3,
    ),
}
TOKEN_IDS = {"<s>": S_ID, "</s>": EOS_ID, ".": DOT_ID, "<never>": NEVER_ID}


def _rel_err(got: float, want: float) -> float:
    return abs(got - want) / abs(want)


@pytest.mark.parametrize("case", sorted(CASES))
def test_guidance_loss_matches_dense_reference(case: str) -> None:
    text, tokens, start, groups, layers = CASES[case]
    rng = np.random.default_rng(sorted(CASES).index(case))
    attentions = random_attention(rng, layers)
    ids = example_ids(rng)
    spec = HeadSpec.parse(text, tokens=tokens, start_layer=start)
    want, _ = dense_loss_and_grad(attentions, groups, start, ids)

    by_map = guidance_loss([jnp.asarray(a) for a in attentions], spec, ids, TOKEN_IDS)
    assert by_map.dtype == jnp.float32 and by_map.shape == ()
    assert _rel_err(float(by_map), want) <= 1e-6, (float(by_map), want)
    if tokens:
        by_seq = guidance_loss(attentions, spec, ids, [TOKEN_IDS[t] for t in tokens])
        assert _rel_err(float(by_seq), want) <= 1e-6


@pytest.mark.parametrize("case", ["reference_0114", "token_sparse_dense_absent_start1"])
def test_group_losses_and_guide_match_dense_reference_per_group(case: str) -> None:
    text, tokens, _, groups, _ = CASES[case]
    rng = np.random.default_rng(1)
    (attention,) = random_attention(rng, 1)
    ids = example_ids(rng)
    spec = HeadSpec.parse(text, tokens=tokens)
    masks = token_masks(jnp.asarray(ids), [TOKEN_IDS[t] for t in tokens]) if tokens else None
    want = [dense_loss_and_grad([attention], [g], 0, ids)[0] for g in groups]

    guided = attention[:, : spec.num_guided_heads]
    per_group = np.asarray(group_losses(jnp.asarray(guided), spec, masks))
    assert per_group.shape == (len(groups),)
    np.testing.assert_allclose(per_group, want, rtol=1e-6)
    # The Guide used inside the model slices the guided heads itself from the full map.
    np.testing.assert_allclose(
        np.asarray(Guide(spec, masks).layer_losses(jnp.asarray(attention))), want, rtol=1e-6
    )


def test_head_square_sums_score_each_head_against_its_own_target() -> None:
    """Per head, ``Σ (A - P)²`` over batch, queries and keys: three token-set groups on different
    tokens (one absent), so a head scored against another group's tokens is caught."""
    text, tokens, _, groups, _ = CASES["token_sparse_dense_absent_start1"]
    rng = np.random.default_rng(13)
    (attention,) = random_attention(rng, 1)
    ids = example_ids(rng)
    spec = HeadSpec.parse(text, tokens=tokens)
    masks = token_masks(jnp.asarray(ids), [TOKEN_IDS[t] for t in tokens])
    got = np.asarray(jax.jit(lambda a: head_square_sums(a, spec, masks))(jnp.asarray(attention)))
    assert got.shape == (H,)
    for pattern, heads, token_id in groups:
        target = dense_target(pattern, N, ids, token_id)
        for head in heads:
            want = np.sum((attention[:, head].astype(np.float64) - target) ** 2)
            np.testing.assert_allclose(got[head], want, rtol=1e-6, err_msg=f"head {head}")


def test_token_masks_mark_every_occurrence_per_example() -> None:
    ids = example_ids(np.random.default_rng(2))
    masks = np.asarray(token_masks(jnp.asarray(ids), [DOT_ID, EOS_ID, NEVER_ID]))
    assert masks.shape == (3, B, N) and masks.dtype == np.float32
    np.testing.assert_array_equal(masks[0], ids == DOT_ID)
    np.testing.assert_array_equal(masks[1], ids == EOS_ID)
    assert masks[0, 0].sum() == 0 and masks[0, 1].sum() == 9 and masks[2].sum() == 0


def test_guidance_loss_gradient_matches_dense_formula() -> None:
    text, tokens, start, groups, layers = CASES["everything_start1"]
    rng = np.random.default_rng(3)
    attentions = random_attention(rng, layers)
    ids = example_ids(rng)
    spec = HeadSpec.parse(text, tokens=tokens, start_layer=start)
    _, want = dense_loss_and_grad(attentions, groups, start, ids)

    grad_fn = jax.jit(jax.grad(lambda maps: guidance_loss(maps, spec, ids, TOKEN_IDS)))
    grads = grad_fn([jnp.asarray(a) for a in attentions])
    for layer, (got, expected) in enumerate(zip(grads, want, strict=True)):
        scale = np.abs(expected).max() if layer >= start else 1.0
        np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-6 * scale)
        if layer < start:
            assert not np.asarray(got).any()  # unguided layers get no gradient
    # heads past the guided ones get no gradient in any layer
    assert not np.asarray(grads[-1][:, spec.num_guided_heads :]).any()


def test_attention_equal_to_targets_gives_zero_loss() -> None:
    rng = np.random.default_rng(4)
    ids = example_ids(rng)
    spec = HeadSpec.parse("1,1,1,2,1", tokens=("</s>",), start_layer=0)
    attention = np.asarray(random_attention(rng, 1)[0])
    patterns = [("self", None), ("next", None), ("prev", None), ("first", None)]
    patterns += [("first", None), ("token", EOS_ID)]
    for head, (pattern, token_id) in enumerate(patterns):
        attention[:, head] = dense_target(pattern, N, ids, token_id)
    loss = guidance_loss([jnp.asarray(attention)] * 2, spec, ids, TOKEN_IDS)
    assert abs(float(loss)) <= 1e-6
    # and a single wrong entry makes it positive by exactly 1 / (B * k * n * n)
    attention[0, 0, 3, 3] = 0.0  # a self-pattern head misses one diagonal entry
    loss = guidance_loss([jnp.asarray(attention)], spec, ids, TOKEN_IDS)
    np.testing.assert_allclose(float(loss), 1.0 / (B * 1 * N * N), rtol=1e-5)


def test_unguided_heads_do_not_affect_the_loss() -> None:
    rng = np.random.default_rng(5)
    attentions = random_attention(rng, 2)
    spec = HeadSpec.parse("0,1,1,4")
    base = float(guidance_loss(attentions, spec))
    changed = [a.copy() for a in attentions]
    for a in changed:
        a[:, 6:] = rng.permutation(a[:, 6:], axis=-1)
    assert float(guidance_loss(changed, spec)) == base
    changed[1][:, 5] = changed[1][:, 5, :, ::-1]  # a guided head (first pattern) changes it
    assert float(guidance_loss(changed, spec)) != base


def test_guidance_loss_under_jit_matches_eager() -> None:
    rng = np.random.default_rng(6)
    text, tokens, start, _, layers = CASES["probing_tokens"]
    spec = HeadSpec.parse(text, tokens=tokens, start_layer=start)
    attentions = [jnp.asarray(a) for a in random_attention(rng, layers)]
    ids = jnp.asarray(example_ids(rng))
    jitted = jax.jit(lambda maps, x: guidance_loss(maps, spec, x, TOKEN_IDS))
    np.testing.assert_allclose(
        float(jitted(attentions, ids)),
        float(guidance_loss(attentions, spec, ids, TOKEN_IDS)),
        rtol=1e-6,
    )


@pytest.mark.parametrize("eps", [1e-2, 1e-4])
def test_guidance_loss_precise_for_heads_close_to_their_pattern(eps: float) -> None:
    # Trained heads sit this close to their pattern; an expanded-square formula cancels here.
    rng = np.random.default_rng(7)
    n = 256
    target = dense_target("first", n, np.zeros((2, n), np.int64), None)[:, None]  # [2,1,n,n]
    noise = rng.dirichlet(np.ones(n), size=(2, 1, n))
    attention = ((1 - eps) * target + eps * noise).astype(np.float32)  # rows still sum to 1
    want = np.mean((attention.astype(np.float64) - target) ** 2)
    got = float(guidance_loss([jnp.asarray(attention)], HeadSpec.parse("0,0,0,1")))
    assert _rel_err(got, want) <= 1e-5, (got, want)


def test_guidance_loss_argument_errors() -> None:
    attentions = random_attention(np.random.default_rng(8), 2, shape=(1, 4, 5, 5))
    with pytest.raises(ValueError, match="at least one layer"):
        guidance_loss([], HeadSpec.parse("0,0,0,1"))
    with pytest.raises(SpecError, match="needs 6 heads"):
        guidance_loss(attentions, HeadSpec.parse("0,1,1,4"))
    with pytest.raises(SpecError, match="start layer 2"):
        guidance_loss(attentions, HeadSpec.parse("0,0,0,1", start_layer=2))
    spec = HeadSpec.parse("0,0,0,1,1", tokens=("</s>",))
    with pytest.raises(ValueError, match="input_ids and token_ids"):
        guidance_loss(attentions, spec)
    ids = np.zeros((1, 5), np.int32)
    with pytest.raises(ValueError, match=re.escape("['</s>']")):
        guidance_loss(attentions, spec, ids, {"<s>": 0})
    with pytest.raises(ValueError, match="2 token ids for 1 token groups"):
        guidance_loss(attentions, spec, ids, [2, 3])


# ----------------------------------------------------------------------------- head specs


def test_parse_reference_numeric_form() -> None:
    spec = HeadSpec.parse("0,1,1,4")
    assert spec.groups == (
        PatternGroup("next", 1),
        PatternGroup("prev", 1),
        PatternGroup("first", 4),
    )
    assert spec.head_ranges == ((0, 1), (1, 2), (2, 6))
    assert spec.num_guided_heads == 6
    assert spec.tokens == ()
    assert spec.start_layer == 0
    assert str(spec) == "next:1,prev:1,first:4"
    assert HeadSpec.parse(" 0 , 1,1 ,4 ") == spec


def test_parse_uneven_counts_keep_head_order() -> None:
    spec = HeadSpec.parse("1,2,0,3", start_layer=2)
    assert [g.name for g in spec.groups] == ["self", "next", "first"]
    assert spec.head_ranges == ((0, 1), (1, 3), (3, 6))
    assert spec.start_layer == 2
    assert not spec.guides_layer(1) and spec.guides_layer(2) and spec.guides_layer(5)


def test_parse_probing_form_with_tokens() -> None:
    spec = HeadSpec.parse("0,1,1,0,3,3", tokens=("<s>", "</s>"))
    assert spec.groups == (
        PatternGroup("next", 1),
        PatternGroup("prev", 1),
        PatternGroup("token", 3, "<s>"),
        PatternGroup("token", 3, "</s>"),
    )
    assert spec.tokens == ("<s>", "</s>")
    assert spec.head_ranges == ((0, 1), (1, 2), (2, 5), (5, 8))
    assert spec.num_guided_heads == 8
    assert str(spec) == "next:1,prev:1,token[<s>]:3,token[</s>]:3"
    # a zero token count drops that token's group, and its token
    assert HeadSpec.parse("0,0,0,1,0,2", tokens=("<s>", "</s>")).tokens == ("</s>",)


def test_named_form_equals_numeric_form_and_str_round_trips() -> None:
    named = HeadSpec.parse("next:1, prev:1 ,first : 4")
    assert named == HeadSpec.parse("0,1,1,4")
    assert HeadSpec.parse("self:0,next:1,prev:1,first:4") == named  # zero groups dropped
    probing = HeadSpec.parse("0,1,1,0,3,3", tokens=("<s>", "</s>"), start_layer=1)
    assert HeadSpec.parse("next:1,prev:1,token[<s>]:3,token[</s>]:3", start_layer=1) == probing
    for spec in (named, probing, HeadSpec.parse("first:2,self:1,token[.]:2,next:3")):
        assert HeadSpec.parse(str(spec), start_layer=spec.start_layer) == spec


def test_named_form_assigns_heads_in_listed_order() -> None:
    spec = HeadSpec.parse("first:2,token[.]:1,self:3")
    assert [g.name for g in spec.groups] == ["first", "token[.]", "self"]
    assert spec.head_ranges == ((0, 2), (2, 3), (3, 6))
    assert spec.tokens == (".",)


def test_named_form_takes_bracketed_tokens() -> None:
    """BERT's delimiters are spelled with brackets: token[[SEP]] names the token [SEP]."""
    spec = HeadSpec.parse("first:1,token[[SEP]]:1,token[.]:1")
    assert [g.name for g in spec.groups] == ["first", "token[[SEP]]", "token[.]"]
    assert spec.tokens == ("[SEP]", ".")
    assert HeadSpec.parse(str(spec)) == spec
    assert HeadSpec.parse("token[[CLS]] : 2 , token[]]:1").tokens == ("[CLS]", "]")
    probing = HeadSpec.parse("0,1,1,0,3,3", tokens=("[SEP]", "."))
    assert HeadSpec.parse("next:1,prev:1,token[[SEP]]:3,token[.]:3") == probing
    with pytest.raises(SpecError, match="cannot parse"):
        HeadSpec.parse("first:1,token[]:1")
    # an unbalanced name is still one token (the tokenizer's lookup then refuses "[SEP")
    assert HeadSpec.parse("token[[SEP]:1").tokens == ("[SEP",)


def test_validate_accepts_a_spec_that_fits() -> None:
    HeadSpec.parse("0,1,1,4", start_layer=3).validate(num_heads=6, num_layers=4)


class _FakeTokenizer:
    def __init__(self, vocab: dict[str, int]):
        self.vocab = vocab

    def token_to_id(self, token: str) -> int:
        if token not in self.vocab:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return self.vocab[token]


def test_token_ids_from_tokenizer() -> None:
    spec = HeadSpec.parse("0,1,1,0,3,3", tokens=("<s>", "</s>"))
    assert spec.token_ids(_FakeTokenizer({"<s>": 0, "</s>": 2, ".": 4})) == (0, 2)
    assert HeadSpec.parse("0,1,1,4").token_ids(_FakeTokenizer({})) == ()


def test_token_ids_unknown_token_names_it() -> None:
    spec = HeadSpec.parse("0,1,1,0,3,3", tokens=("<s>", "<unknown-tok>"))
    with pytest.raises(ValueError, match=re.escape("'<unknown-tok>'")) as info:
        spec.token_ids(_FakeTokenizer({"<s>": 0}))
    assert "'<s>'" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "tokens", "match"),
    [
        ("", (), "empty"),
        ("   ", (), "empty"),
        ("next:1,diag:2", (), "'diag:2'"),
        ("next:1,prev:-1", (), "'-1' for prev"),
        ("first:1.5", (), "'1.5' for first"),
        ("first:x", (), "'x' for first"),
        ("0,-1,1,4", (), "-1"),
        ("0,1.5,1,4", (), "1.5"),
        ("0,1,,4", (), "empty entry"),
        ("0,1,1", (), "has 3 counts"),
        ("0,1,1,0,3", ("<s>", "</s>"), "1 token-set counts .* but 2 tokens"),
        ("0,1,1,0,3,3", ("<s>",), "2 token-set counts .* but 1 tokens"),
        ("0,1,1,4,2", (), "1 token-set counts .* but 0 tokens"),
        ("next:1,token[.]:2", ("<s>",), "only used with the numeric"),
        ("next:1,prev:1,next:2", (), "'next' is listed twice"),
        ("token[.]:1,token[.]:2", (), r"'token\[\.\]' is listed twice"),
        ("0,0,0,0", (), "'0,0,0,0' guides no head"),
        ("next:0,first:0", (), "guides no head"),
    ],
)
def test_parse_errors_name_the_offending_value(text: str, tokens: tuple, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        HeadSpec.parse(text, tokens=tokens)


def test_spec_error_is_a_value_error() -> None:
    assert issubclass(SpecError, ValueError)


@pytest.mark.parametrize("start", [-1, 1.5, True])
def test_parse_rejects_bad_start_layer(start) -> None:
    with pytest.raises(SpecError, match=re.escape(repr(start))):
        HeadSpec.parse("0,1,1,4", start_layer=start)


def test_validate_rejects_more_heads_than_the_model_has() -> None:
    spec = HeadSpec.parse("0,1,1,4,3", tokens=("</s>",))
    with pytest.raises(SpecError, match="needs 9 heads but the model has 8 per layer"):
        spec.validate(num_heads=8, num_layers=4)
    spec.validate(num_heads=9, num_layers=4)


def test_validate_rejects_start_layer_out_of_range() -> None:
    spec = HeadSpec.parse("0,1,1,4", start_layer=4)
    with pytest.raises(SpecError, match=r"start layer 4 is out of range .* 4 layers"):
        spec.validate(num_heads=12, num_layers=4)
    spec.validate(num_heads=12, num_layers=5)


# ----------------------------------------------------------------------------- weight schedule

SCHEDULE = dict(scale=10.0, stagnant_steps=100, total_steps=300)
# step -> scale * w(step): constant before 100, then (300 - step) / 200, then 0
EXPECTED_WEIGHTS = {
    0: 10.0,
    1: 10.0,
    99: 10.0,
    100: 10.0,
    150: 7.5,
    200: 5.0,
    299: 0.05,
    300: 0.0,
    301: 0.0,
    10_000: 0.0,
}


def test_guidance_weight_schedule() -> None:
    for step, want in EXPECTED_WEIGHTS.items():
        np.testing.assert_allclose(float(guidance_weight(step, **SCHEDULE)), want, atol=1e-6)


def test_guidance_weight_under_jit_with_traced_step() -> None:
    weight = jax.jit(lambda step: guidance_weight(step, **SCHEDULE))
    steps = jnp.asarray(list(EXPECTED_WEIGHTS), jnp.int32)
    got = [float(weight(s)) for s in steps]  # one compilation, traced scalar steps
    np.testing.assert_allclose(got, list(EXPECTED_WEIGHTS.values()), atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(jax.jit(jax.vmap(weight))(steps)), list(EXPECTED_WEIGHTS.values()), atol=1e-6
    )


def test_guidance_weight_when_stagnant_covers_the_whole_run() -> None:
    # The reference default stagnant_steps=20000 with a shorter run: full weight throughout.
    kwargs = dict(scale=100.0, stagnant_steps=20_000, total_steps=1_000)
    assert float(guidance_weight(0, **kwargs)) == 100.0
    assert float(guidance_weight(999, **kwargs)) == 100.0
    assert float(guidance_weight(20_000, **kwargs)) == 0.0


# ----------------------------------------------------------------------------- user patterns


def _band(k: int, n: int) -> np.ndarray:
    """Independent ±k window, row-normalised, written entry by entry."""
    target = np.zeros((n, n))
    for i in range(n):
        keys = [j for j in range(n) if abs(i - j) <= k]
        for j in keys:
            target[i, j] = 1.0 / len(keys)
    return target


def _dense_user_loss(attention: np.ndarray, heads: list[int], target: np.ndarray) -> float:
    diff = attention[:, heads].astype(np.float64) - target[None, None]
    return float(np.mean(diff**2))


class _CountingBuilder:
    """A ``k``-th previous token pattern that counts how often it is built, per length."""

    def __init__(self, offset: int = -2):
        self.offset = offset
        self.calls: list[int] = []

    def __call__(self, n: int) -> np.ndarray:
        self.calls.append(n)
        return np.eye(n, k=self.offset)


def test_builtin_registered_patterns_are_available() -> None:
    from guided_jax.guidance import pattern_target, registered_patterns

    names = registered_patterns()
    for name in ("window1", "window2", "window3", "prev2", "next2", "last"):
        assert name in names
    np.testing.assert_allclose(pattern_target("window2", 7), _band(2, 7), rtol=1e-6)
    np.testing.assert_array_equal(pattern_target("prev2", 5), np.eye(5, k=-2))
    assert pattern_target("last", 4)[:, -1].tolist() == [1.0] * 4
    assert not pattern_target("window2", 7).flags.writeable  # the cached constant is shared


@pytest.mark.parametrize("case", ["window2_after_next", "custom_between_tokens"])
def test_user_pattern_loss_and_gradient_match_dense_formula(case: str) -> None:
    from guided_jax.guidance import register_pattern

    builder = _CountingBuilder(-3)
    register_pattern("test_prev3_dense", builder, replace=True)
    rng = np.random.default_rng(10)
    (attention,) = random_attention(rng, 1)
    ids = example_ids(rng)
    if case == "window2_after_next":
        spec = HeadSpec.parse("next:1,window2:2")
        expected = [
            dense_loss_and_grad([attention], [("next", [0], None)], 0, ids)[0],
            _dense_user_loss(attention, [1, 2], _band(2, N)),
        ]
        masks = None
    else:
        spec = HeadSpec.parse("token[.]:1,test_prev3_dense:2,first:1")
        expected = [
            dense_loss_and_grad([attention], [("token", [0], DOT_ID)], 0, ids)[0],
            _dense_user_loss(attention, [1, 2], np.eye(N, k=-3)),
            dense_loss_and_grad([attention], [("first", [3], None)], 0, ids)[0],
        ]
        masks = token_masks(jnp.asarray(ids), [DOT_ID])
    got = jax.jit(lambda a: Guide(spec, masks).layer_losses(a))(jnp.asarray(attention))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)
    # gradient of the summed loss: 2 (A - P) / size within each group
    grad = jax.grad(lambda a: jnp.sum(Guide(spec, masks).layer_losses(a)))(jnp.asarray(attention))
    if case == "window2_after_next":
        want = 2.0 * (attention[:, 1:3] - _band(2, N)[None, None]) / (B * 2 * N * N)
        np.testing.assert_allclose(np.asarray(grad)[:, 1:3], want, atol=1e-9)
    assert not np.asarray(grad)[:, spec.num_guided_heads :].any()


def test_user_target_is_built_once_per_length() -> None:
    from guided_jax.guidance import pattern_target, register_pattern

    builder = _CountingBuilder()
    register_pattern("test_counted_once", builder, replace=True)
    spec = HeadSpec.parse("test_counted_once:2")
    step = jax.jit(lambda a: jnp.sum(Guide(spec).layer_losses(a)))
    rng = np.random.default_rng(11)
    for _ in range(3):  # three "steps" at one length, then another length
        step(jnp.asarray(random_attention(rng, 1)[0]))
    step(jnp.asarray(random_attention(rng, 1, shape=(B, H, 9, 9))[0]))
    assert pattern_target("test_counted_once", N) is pattern_target("test_counted_once", N)
    assert builder.calls == [N, 9]
    register_pattern("test_counted_once", builder, replace=True)  # rebinding drops the cache
    pattern_target("test_counted_once", N)
    assert builder.calls == [N, 9, N]


def test_named_form_takes_registered_patterns_and_rejects_unknown_ones() -> None:
    spec = HeadSpec.parse("next:1,window2:2,prev2:1")
    assert [g.name for g in spec.groups] == ["next", "window2", "prev2"]
    assert spec.user_patterns == ("window2", "prev2")
    assert HeadSpec.parse(str(spec)) == spec
    with pytest.raises(SpecError, match=r"unknown pattern 'window9' in 'window9:2'.*window2"):
        HeadSpec.parse("next:1,window9:2")


@pytest.mark.parametrize(
    ("name", "builder", "kwargs", "match"),
    [
        ("2bad", np.eye, {}, "must be an identifier"),
        ("next", np.eye, {}, "reserved"),
        ("layers", np.eye, {}, "reserved"),
        ("window2", np.eye, {}, "already registered"),
        ("test_not_callable", 3, {}, "must be a function"),
    ],
)
def test_register_pattern_errors(name, builder, kwargs, match) -> None:
    from guided_jax.guidance import register_pattern

    with pytest.raises(SpecError, match=match):
        register_pattern(name, builder, **kwargs)


@pytest.mark.parametrize(
    ("builder", "normalize", "match"),
    [
        (lambda n: np.ones((n, n + 1)), False, r"shape \(5, 6\), expected \(5, 5\)"),
        (lambda n: np.full((n, n), np.nan), False, "non-finite"),
        (lambda n: -np.eye(n), True, "negative values"),
        (lambda n: [["a"] * n] * n, False, "not numeric"),
    ],
)
def test_bad_builder_output_is_named(builder, normalize, match) -> None:
    from guided_jax.guidance import pattern_target, register_pattern

    register_pattern("test_bad_builder", builder, normalize=normalize, replace=True)
    with pytest.raises(SpecError, match="'test_bad_builder'.*" + match):
        pattern_target("test_bad_builder", 5)


def test_row_normalisation_leaves_empty_rows_empty() -> None:
    from guided_jax.guidance import pattern_target, register_pattern

    register_pattern(
        "test_norm_prev", lambda n: 3.0 * np.eye(n, k=-1), normalize=True, replace=True
    )
    target = pattern_target("test_norm_prev", 4)
    np.testing.assert_array_equal(target, np.eye(4, k=-1))


# ----------------------------------------------------------------------------- per-layer specs


def test_layered_spec_parses_parts_and_lays_out_the_runs_groups() -> None:
    from guided_jax.guidance import LayeredSpec, parse_spec

    spec = parse_spec("layers=0-1:next:1,prev:1; 2:first:2,window2:1,next:1;3-3:0,0,0,1")
    assert isinstance(spec, LayeredSpec)
    assert [g.name for g in spec.groups] == ["next", "prev", "first", "window2"]
    assert spec.for_layer(4) is None and not spec.guides_layer(4)
    layer2 = spec.for_layer(2)
    assert layer2.head_ranges == ((0, 2), (2, 3), (3, 4))
    assert layer2.output_slots() == ((2, 3, 0), 4)
    assert spec.for_layer(0) is spec.for_layer(1)
    assert spec.for_layer(3).output_slots() == ((2,), 4)
    assert spec.num_guided_heads == 4
    assert parse_spec(str(spec)) == spec
    assert str(spec) == "layers=0-1:next:1,prev:1;2:first:2,window2:1,next:1;3:first:1"
    spec.validate(num_heads=4, num_layers=4)
    # A uniform spec is still a HeadSpec.
    assert isinstance(parse_spec("0,1,1,4", start_layer=1), HeadSpec)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("layers=", "names no layers"),
        ("layers=0-1:next:1;;2:first:1", "empty part"),
        ("layers=0-3:next:1;2-5:first:1", r"layers 2-3 are given by both '0-3:next:1' and '2-5"),
        ("layers=1:next:1;0-1:first:2", r"layers 1-1 are given by both"),
        ("layers=3-1:next:1", "reversed"),
        ("layers=a-b:next:1", "cannot parse 'a-b:next:1'"),
        ("layers=0:next:1,foo:2", r"layers 0-0 of .*unknown pattern 'foo'"),
        ("layers=0:next:1,next:2", "listed twice"),
    ],
)
def test_layered_spec_errors(text: str, match: str) -> None:
    from guided_jax.guidance import parse_spec

    with pytest.raises(SpecError, match=match):
        parse_spec(text)


def test_layered_spec_validation_names_the_part() -> None:
    from guided_jax.guidance import parse_spec

    spec = parse_spec("layers=0-1:next:1;2-5:first:3")
    with pytest.raises(SpecError, match=r"layer range 2-5 .* out of range .* 4 layers"):
        spec.validate(num_heads=4, num_layers=4)
    with pytest.raises(SpecError, match=r"layers 2-5 .* need 3 heads but the model has 2"):
        spec.validate(num_heads=2, num_layers=8)
    with pytest.raises(SpecError, match="start_layer=1 cannot be combined"):
        parse_spec("layers=0:next:1", start_layer=1)
    with pytest.raises(SpecError, match="parse_spec"):
        HeadSpec.parse("layers=0:next:1")


def test_layered_guidance_loss_matches_dense_reference_per_layer() -> None:
    from guided_jax.guidance import parse_spec

    rng = np.random.default_rng(12)
    attentions = random_attention(rng, 4)
    ids = example_ids(rng)
    spec = parse_spec("layers=0:next:2,token[</s>]:1;2-3:token[.]:1,window1:1,next:1")
    band = _band(1, N)
    want = dense_loss_and_grad(
        attentions[:1], [("next", [0, 1], None), ("token", [2], EOS_ID)], 0, ids
    )[0]
    for layer in (2, 3):
        want += dense_loss_and_grad([attentions[layer]], [("token", [0], DOT_ID)], 0, ids)[0]
        want += _dense_user_loss(attentions[layer], [1], band)
        want += dense_loss_and_grad([attentions[layer]], [("next", [2], None)], 0, ids)[0]
    got = guidance_loss([jnp.asarray(a) for a in attentions], spec, ids, TOKEN_IDS)
    assert _rel_err(float(got), want) <= 1e-6
    # per layer, the losses land in the run's groups: next, token[</s>], token[.], window1
    masks = token_masks(jnp.asarray(ids), [EOS_ID, DOT_ID])
    layer2 = Guide(spec, masks).for_layer(2)
    assert layer2.spec.tokens == (".",) and layer2.masks.shape == (1, B, N)
    losses = np.asarray(layer2.layer_losses(jnp.asarray(attentions[2])))
    assert losses.shape == (4,) and losses[1] == 0.0 and losses[0] > 0 and losses[2] > 0
    assert Guide(spec, masks).for_layer(1) is None


def test_config_refuses_registered_patterns_for_kernels_without_them(tiny_config) -> None:
    from guided_jax.config import ConfigError, check_config

    tiny_config.guidance.heads = "layers=0:next:1;1:window1:1"
    check_config(tiny_config)
    tiny_config.model.attention = "flash"
    check_config(tiny_config)
    tiny_config.model.attention = "pallas"
    tiny_config.model.attention_dropout = 0.0
    with pytest.raises(ConfigError, match=r"\['window1'\].*model.attention='pallas'"):
        check_config(tiny_config)


def test_start_layer_can_hold_back_only_the_token_groups() -> None:
    """guidance.start_layer_groups=tokens: below the start layer the positional heads are still
    guided (same heads, same loss slots) and the token-set heads are not."""
    rng = np.random.default_rng(7)
    attentions = random_attention(rng, 3)
    ids = example_ids(rng)
    groups = [("next", [0], None), ("prev", [1], None), ("token", [2, 3], EOS_ID)]
    for mode in ("all", "tokens"):
        spec = HeadSpec.parse("0,1,1,0,2", tokens=("</s>",), start_layer=2, start_layer_groups=mode)
        want, _ = dense_loss_and_grad(attentions, groups, 2, ids, start_layer_groups=mode)
        got = guidance_loss([jnp.asarray(a) for a in attentions], spec, ids, TOKEN_IDS)
        assert _rel_err(float(got), want) <= 1e-6, (mode, float(got), want)
    below = spec.for_layer(1)
    assert below is not None and [g.name for g in below.groups] == ["next", "prev"]
    assert below.head_ranges == ((0, 1), (1, 2)) and below.output_slots() == ((0, 1), 3)
    assert spec.for_layer(2) is spec
    only_tokens = HeadSpec.parse("token[</s>]:2", start_layer=1, start_layer_groups="tokens")
    assert only_tokens.for_layer(0) is None and not only_tokens.guides_layer(0)
    with pytest.raises(SpecError, match=r"token groups before other groups"):
        HeadSpec.parse("token[</s>]:2,next:1", start_layer=1, start_layer_groups="tokens")
    with pytest.raises(SpecError, match=r"must be one of \['all', 'tokens'\], got 'some'"):
        HeadSpec.parse("0,1,1,4", start_layer=1, start_layer_groups="some")
