"""Blockwise ("flash") attention that scores guided heads on the fly: no ``n x n`` array is kept.

The forward pass walks over blocks of keys with the online softmax (running max ``m``, running sum
``l``) and, for guided heads, four more running row sums of the (dropped-out) probabilities ``a``
against the head's 0/1 target ``P``: off-target squares ``Σ_{P=0} a²``, on-target sums ``Σ_{P=1} a``
and ``Σ_{P=1} a²`` and the target count. Per row, with ``S = Σ_{P=1} a``, ``Q = Σ_{P=1} a²``:

    Σ_j (a_j - P_j)² = off + (S - 1)² + (Q - S²) + (count - 1)

where ``Q - S²`` vanishes for rows with at most one target (every positional pattern) and is
left out there: this keeps the small losses of heads that follow their pattern free of the
cancellation of ``Σa² - 2Σa·P + ΣP`` (docs/DESIGN.md §2). The backward pass recomputes each block's
probabilities from ``m`` and ``l`` and adds the guidance gradient ``2c(a - P)`` to ``dO·Vᵀ``
(``c`` is the cotangent of the head's loss sum); its row term becomes
``D = rowsum(dO ⊙ O) + 2c Σ_j a_j (a_j - P_j)``. Memory is ``O(n · block)`` per head.

Registered patterns (``guidance.register_pattern``) have a constant dense target ``P`` (any
values, e.g. row-normalised windows); each key block slices its columns out of it. Then ``on1``
sums ``a·P`` (``R``) instead of ``a``, and per row, with ``p`` the value of a row's only target:
``Σ_j (a_j - P_j)² = off + (R/p - p)² + (ΣP² - p²)`` for rows with at most one nonzero target and
``off + Q - 2R + ΣP²`` for the others (for 0/1 targets, ``p = 1`` and ``ΣP² = count``: the
formulas above). Their backward pull is ``2c(a - P)`` with the sliced target.

Dropout masks are drawn per key block from ``fold_in(key, block)``, so the backward regenerates
them instead of storing them (:func:`dropout_keep_mask` builds the whole mask, for tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from guided_jax.guidance import HeadSpec
from guided_jax.kernels.dropout import keep_mask, keep_scale
from guided_jax.kernels.segments import visible
from guided_jax.kernels.targets import (
    NEG,
    NONE,
    HeadPatterns,
    head_token_masks,
    key_bias,
    target_counts,
    target_tile,
    user_row_stats,
    user_targets,
    user_tile,
    user_weights,
)


def dropout_keep_mask(
    key: jax.Array, shape: tuple[int, int, int, int], rate: float, block: int
) -> jax.Array:
    """The ``[B, H, n, n_keys]`` keep mask the kernel draws, block by block (for tests)."""
    batch, heads, n, n_keys = shape
    blocks = -(-n_keys // block)
    tiles = [
        keep_mask(jax.random.fold_in(key, j), rate, (batch, heads, n, block)) for j in range(blocks)
    ]
    return jnp.concatenate(tiles, axis=-1)[..., :n_keys]


@dataclasses.dataclass(frozen=True)
class _Static:
    patterns: HeadPatterns | None  # None: no head of this layer is guided
    dropout_rate: float
    after_dropout: bool
    block: int
    n: int  # true sequence length (keys are padded to a multiple of block)


def _blocks(x: jax.Array, block: int) -> jax.Array:
    """``[B, n_padded, ...]`` → ``[n_blocks, B, block, ...]`` for scanning."""
    b, n = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, n // block, block, *x.shape[2:]), 1, 0)


def _keep_scale(static: _Static, key: jax.Array | None, j: jax.Array, shape) -> jax.Array | None:
    """The kept elements' scale (0 where dropped) of key block ``j``, or None without dropout."""
    if key is None or static.dropout_rate == 0.0:
        return None
    keep = keep_mask(jax.random.fold_in(key, j), static.dropout_rate, shape)
    return keep.astype(jnp.float32) * keep_scale(static.dropout_rate)


def _scores(
    q: jax.Array,
    k_block: jax.Array,
    bias_block: jax.Array,
    segments: jax.Array | None = None,
    segments_block: jax.Array | None = None,
) -> jax.Array:
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k_block, preferred_element_type=jnp.float32)
    s = s * q.shape[-1] ** -0.5 + bias_block[:, None, None, :]
    if segments is None:
        return s
    # Another document's keys: hidden like padding (data.document_masks).
    seen = visible(segments, segments_block)[:, None]
    return jnp.where(seen, s, NEG)


def _key_blocks(k, v, bias, segments, block: int) -> tuple:
    """What both passes scan over, block by block: the block index, keys, values, key bias and
    key segment ids (None without document masks)."""
    return (
        jnp.arange(k.shape[1] // block),
        _blocks(k, block),
        _blocks(v, block),
        _blocks(bias, block),
        None if segments is None else _blocks(segments, block),
    )


def _forward(static: _Static, q, k, v, bias, head_tokens, key, segments=None):
    batch, n, heads, _ = q.shape
    block = static.block
    guided = static.patterns is not None
    rows = (batch, heads, n)
    init = dict(
        m=jnp.full(rows, -jnp.inf, jnp.float32),
        l=jnp.zeros(rows, jnp.float32),
        acc=jnp.zeros((batch, heads, n, v.shape[-1]), jnp.float32),
    )
    user = user_targets(static.patterns, static.n, k.shape[1]) if guided else None
    query_segments = None if segments is None else segments[:, :n]
    if guided:
        init.update(off=init["l"], on1=init["l"])
        if head_tokens is not None or user is not None:  # several targets per row are possible
            init.update(on2=init["l"])

    def body(carry, xs):
        j, k_j, v_j, bias_j, segments_j = xs
        s = _scores(q, k_j, bias_j, query_segments, segments_j)
        m = jnp.maximum(carry["m"], jnp.max(s, axis=-1))
        alpha = jnp.exp(carry["m"] - m)
        e = jnp.exp(s - m[..., None])
        scale = _keep_scale(static, key, j, s.shape)
        dropped = e if scale is None else e * scale
        out = dict(
            m=m,
            l=carry["l"] * alpha + jnp.sum(e, axis=-1),
            acc=carry["acc"] * alpha[..., None]
            + jnp.einsum(
                "bhqk,bkhd->bhqd", dropped.astype(v.dtype), v_j, preferred_element_type=jnp.float32
            ),
        )
        if guided:
            a = dropped if static.after_dropout else e
            cols = j * block + jnp.arange(block)
            tile_values = user_tile(static.patterns, user, j, block)
            target = target_tile(static.patterns, head_tokens, n, cols, static.n, tile_values)
            squares = jnp.square(a)
            weighted = a if tile_values is None else a * user_weights(static.patterns, tile_values)
            out.update(
                off=carry["off"] * alpha**2 + jnp.sum(jnp.where(target, 0.0, squares), axis=-1),
                on1=carry["on1"] * alpha + jnp.sum(jnp.where(target, weighted, 0.0), axis=-1),
            )
            if "on2" in carry:
                on2 = jnp.sum(jnp.where(target, squares, 0.0), axis=-1)
                out.update(on2=carry["on2"] * alpha**2 + on2)
        return out, None

    xs = _key_blocks(k, v, bias, segments, block)
    carry, _ = jax.lax.scan(body, init, xs)
    total = carry["l"]
    out = (carry["acc"] / total[..., None]).astype(q.dtype)  # [B, H, n, d]
    lse = carry["m"] + jnp.log(total)
    if not guided:
        return out, None, (lse, None)
    on_sum, off = carry["on1"] / total, carry["off"] / total**2
    count = target_counts(static.patterns, head_tokens, n)
    # p: the value of a row's only target (1 for 0/1 patterns); a_t = R / p its probability.
    single, extra = (1.0, 0.0) if user is None else user_row_stats(static.patterns, n)
    on_target = on_sum if user is None else on_sum / single
    row_loss = off + jnp.square(on_target - single) + (count + extra - jnp.square(single))
    # Σ_j a_j (a_j - P_j), the guidance part of the backward's row term.
    row_pull = off + on_target * (on_target - single)
    if "on2" in carry:
        # With at most one target in a row, Q = S² exactly: leave the rounding of Q - S² out
        # there, it would swamp the loss of a head that follows its pattern.
        on_squares, several = carry["on2"] / total**2, count > 1.0
        row_loss = row_loss + jnp.where(several, on_squares - jnp.square(on_target), 0.0)
        row_pull = jnp.where(several, off + on_squares - on_sum, row_pull)
    guided_heads = np.asarray(static.patterns.kind) != NONE
    return out, jnp.where(guided_heads, jnp.sum(row_loss, axis=(0, 2)), 0.0), (lse, row_pull)


def _backward(static: _Static, res, cotangents):
    q, k, v, bias, head_tokens, key, segments, out, lse, row_pull = res
    query_segments = None if segments is None else segments[:, : q.shape[1]]
    d_out, d_head_sums = cotangents
    batch, n = q.shape[:2]
    block = static.block
    guided = static.patterns is not None
    d_out = d_out.astype(jnp.float32)
    row_term = jnp.sum(d_out * out.astype(jnp.float32), axis=-1)  # [B, H, n]
    if guided:
        # Unguided heads' sums are 0 whatever their maps: they pull nothing.
        guided_heads = np.asarray(static.patterns.kind) != NONE
        c = jnp.where(guided_heads, d_head_sums.astype(jnp.float32), 0.0)[None, :, None]
        row_term = row_term + 2.0 * c * row_pull
    user = user_targets(static.patterns, static.n, k.shape[1]) if guided else None
    scale_qk = q.shape[-1] ** -0.5

    def body(dq, xs):
        j, k_j, v_j, bias_j, segments_j = xs
        probs = jnp.exp(_scores(q, k_j, bias_j, query_segments, segments_j) - lse[..., None])
        scale = _keep_scale(static, key, j, probs.shape)
        dropped = probs if scale is None else probs * scale
        dv_j = jnp.einsum(
            "bhqk,bhqd->bkhd",
            dropped.astype(v.dtype),
            d_out.astype(v.dtype),
            preferred_element_type=jnp.float32,
        )
        d_dropped = jnp.einsum(
            "bhqd,bkhd->bhqk", d_out.astype(v.dtype), v_j, preferred_element_type=jnp.float32
        )
        d_probs = d_dropped if scale is None else d_dropped * scale
        if guided:
            cols = j * block + jnp.arange(block)
            tile_values = user_tile(static.patterns, user, j, block)
            target = target_tile(static.patterns, head_tokens, n, cols, static.n, tile_values)
            a = dropped if static.after_dropout else probs
            if tile_values is not None:  # the target's values, not only where it is nonzero
                target = jnp.where(target, user_weights(static.patterns, tile_values), 0.0)
            pull = 2.0 * c[..., None] * (a - target)
            d_probs = d_probs + (
                pull if scale is None or not static.after_dropout else pull * scale
            )
        d_scores = (probs * (d_probs - row_term[..., None]) * scale_qk).astype(q.dtype)
        dq = dq + jnp.einsum("bhqk,bkhd->bqhd", d_scores, k_j, preferred_element_type=jnp.float32)
        dk_j = jnp.einsum("bhqk,bqhd->bkhd", d_scores, q, preferred_element_type=jnp.float32)
        return dq, (dk_j, dv_j)

    xs = _key_blocks(k, v, bias, segments, block)
    dq, (dk, dv) = jax.lax.scan(body, jnp.zeros(q.shape, jnp.float32), xs)

    def unblock(x):  # [n_blocks, B, block, H, d] → [B, n_padded, H, d]
        return jnp.moveaxis(x, 0, 1).reshape(batch, -1, *x.shape[3:])

    return (
        dq.astype(q.dtype),
        unblock(dk).astype(k.dtype),
        unblock(dv).astype(v.dtype),
        None,
        None,
        None,
        None,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(static: _Static, q, k, v, bias, head_tokens, key, segments):
    out, head_sums, _ = _forward(static, q, k, v, bias, head_tokens, key, segments)
    return out, head_sums


def _flash_fwd(static: _Static, q, k, v, bias, head_tokens, key, segments):
    out, head_sums, (lse, row_pull) = _forward(static, q, k, v, bias, head_tokens, key, segments)
    res = (q, k, v, bias, head_tokens, key, segments, out, lse, row_pull)
    return (out, head_sums), res


_flash.defvjp(_flash_fwd, _backward)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    *,
    spec: HeadSpec | None = None,
    token_masks: jax.Array | None = None,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
    after_dropout: bool = True,
    segment_ids: jax.Array | None = None,
    block: int = 512,
) -> tuple[jax.Array, jax.Array | None]:
    """``q, k, v``: ``[B, n, H, d]``; ``key_mask``: ``[B, n]`` keys to attend to.

    Returns the attended values ``[B, n, H, d]`` and, when a layer's ``spec`` is given, each
    head's sum over batch and queries of ``Σ_keys (a - P)²`` (``[H]``, zero for unguided heads),
    whose gradient flows back into ``q`` and ``k``. ``token_masks`` ``[T, B, n]`` says where
    each token-set group's token is. Without ``dropout_key`` no dropout is applied.
    ``segment_ids`` ``[B, n]`` keeps each query inside its document (see
    :mod:`guided_jax.kernels.segments`), masked per tile in both passes.
    """
    patterns = None if spec is None else HeadPatterns.from_spec(spec, q.shape[2])
    n = q.shape[1]
    block = min(block, n)
    padded = -(-n // block) * block
    bias = key_bias(q, k, v, key_mask, padded)
    if padded != n:
        pad = ((0, 0), (0, padded - n), (0, 0), (0, 0))
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    head_tokens = head_token_masks(patterns, token_masks, padded)
    segments = None
    if segment_ids is not None:
        if segment_ids.shape != key_mask.shape:
            raise ValueError(
                f"segment_ids must be [B, n] like key_mask {key_mask.shape}, got "
                f"{segment_ids.shape}"
            )
        segments = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, padded - n)))
    key = dropout_key if dropout_rate > 0.0 else None
    dropout_rate = dropout_rate if key is not None else 0.0
    static = _Static(patterns, float(dropout_rate), after_dropout, block, n)
    out, head_sums = _flash(static, q, k, v, bias, head_tokens, key, segments)
    return jnp.swapaxes(out, 1, 2), head_sums  # [B, n, H, d]
