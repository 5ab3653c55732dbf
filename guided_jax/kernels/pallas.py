"""Guided flash attention as Pallas kernels: Mosaic on TPU, Triton on GPU, interpreted on CPU
(which is how the tests check them).

The same algorithm as :mod:`guided_jax.kernels.flash` (read its docstring for the math), cut
into three kernels over a ``(batch, head, block)`` grid, each program holding one block of queries
or keys in fast memory and walking over the other side:

* forward: per query block, the online softmax plus the guidance row sums → ``O``, ``log Σ e``
  and each row's loss and ``Σ_j a_j (a_j - P_j)``;
* ``dq``: per query block, walks the key blocks;
* ``dk, dv``: per key block, walks the query blocks.

The per-row guidance cotangent ``c`` (zero for unguided heads and padded rows) enters the
backward as ``dA += 2c(a - P)`` and in the row term ``D``.

Layouts are the ones Mosaic accepts (a block's last two dimensions are multiples of (8, 128) or
the whole array's): the kernels work on heads-first ``[B, H, n, d]`` arrays; per-row statistics
live in ``[B, H, n, L]`` arrays whose ``L`` lanes repeat one value (``L`` = 128 on TPU, as Mosaic's
lane width; 1 elsewhere); per-key vectors are ``[B, 1, n]`` (key bias) and ``[B, G, 1, n]`` (where
each token-set group's token is). Each program finds its head's pattern from its program id
(the spec is static), so no per-head array is passed.

Attention dropout follows the reference: every element of every head's map is dropped on its
own with probability ``p`` and the rest scaled by ``1/(1-p)``; guidance scores the dropped maps
when ``after_dropout`` (the reference) and the clean ones otherwise. The keep bits are a
counter-based hash of (seed, batch, head, row, column) (:mod:`guided_jax.kernels.dropout`),
regenerated in the backward; :func:`~guided_jax.kernels.dropout.attention_keep_mask` gives the
same mask as one array. Per-document masks and registered patterns are refused (use ``flash``).

Which backend's tiling and compiler settings apply is decided per lowering platform
(``jax.lax.platform_dependent``), so one traced program lowers for TPU and GPU alike.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton
from jax.sharding import PartitionSpec as P

from guided_jax.guidance import HeadSpec
from guided_jax.kernels.dropout import hash_keep_scale, hash_threshold, hashed_keep, row_hashes
from guided_jax.kernels.targets import DIAGONAL, FIRST, NONE, TOKEN, USER, HeadPatterns, key_bias
from guided_jax.sharding import BATCH_AXES, batch_axes_size


@dataclasses.dataclass(frozen=True)
class Tiling:
    """A backend's settings: rows and keys per tile, the lanes of per-row statistics, and the
    compiler parameters of its ``pallas_call``s (None: interpreted)."""

    block_q: int
    block_k: int
    lanes: int
    compiler: Any = None


def default_tiling(platform: str, dtype: Any) -> Tiling:
    """Tiles for ``platform`` (``tpu``, ``cuda``, or anything else: interpreted with the TPU's
    layouts). On GPU, float32 tiles of 128 rows ask Triton for more shared memory than an H100
    has, so they are 64 (benchmarks/RESULTS.md)."""
    if platform == "cuda":
        block = 128 if jnp.dtype(dtype).itemsize <= 2 else 64
        return Tiling(block, block, 1, pltriton.CompilerParams(num_warps=4, num_stages=2))
    semantics = ("parallel", "parallel", "parallel")
    compiler = pltpu.CompilerParams(dimension_semantics=semantics) if platform == "tpu" else None
    return Tiling(128, 128, 128, compiler)


# Set while a program is traced for one known platform (guided_jax.train.lowering): the kernels
# are then traced for that platform alone instead of for every platform.
_TRACED_FOR: contextvars.ContextVar[str | None] = contextvars.ContextVar("traced_for", default=None)


@contextlib.contextmanager
def traced_for(platform: str) -> Iterator[None]:
    """Within, Pallas attention takes ``platform``'s tiling without a per-platform choice."""
    token = _TRACED_FOR.set(platform)
    try:
        yield
    finally:
        _TRACED_FOR.reset(token)


@dataclasses.dataclass(frozen=True)
class _Static:
    heads: tuple[tuple[int, int, int], ...]  # per head: pattern code, diagonal offset, token group
    tokens: bool  # some head targets token columns: a row may have several targets
    threshold: int  # dropout: keep where the hash's keep bits reach it; 0 = no dropout
    keep_scale: float
    after_dropout: bool
    tiling: Tiling
    n: int  # true length; the arrays are padded to a multiple of both blocks

    @property
    def guided(self) -> bool:
        return any(kind != NONE for kind, _, _ in self.heads)

    @property
    def dropout(self) -> bool:
        return self.threshold > 0


def _head_value(head: jax.Array, values: Sequence[int]) -> jax.Array:
    """``values[head]`` for a program's traced head index, from the static per-head values
    (one select per run of equal values: heads of a pattern group are consecutive)."""
    result = jnp.int32(values[0])
    for h in range(1, len(values)):
        if values[h] != values[h - 1]:
            result = jnp.where(head >= h, jnp.int32(values[h]), result)
    return result


def _head(static: _Static) -> tuple[jax.Array, jax.Array]:
    """This program's pattern code and diagonal offset."""
    head = pl.program_id(1)
    kinds, offsets, _ = zip(*static.heads, strict=True)
    return _head_value(head, kinds), _head_value(head, offsets)


def _wide(x: jax.Array, width: int) -> jax.Array:
    """A ``[rows, L]`` statistic (all lanes equal) against a ``[rows, width]`` tile."""
    lanes = x.shape[-1]
    return x if lanes in (1, width) else jnp.tile(x, (1, width // lanes))


def _narrow(x: jax.Array, lanes: int) -> jax.Array:
    """A ``[rows, 1]`` statistic stored in the ``[rows, L]`` row layout."""
    return jnp.broadcast_to(x, (x.shape[0], lanes))


def _iotas(rows0: jax.Array, cols0: jax.Array, shape: tuple[int, int]):
    rows = rows0 + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    cols = cols0 + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    return rows, cols


def _target(static, kind, offset, tokens, rows, cols):
    """``[bq, bk]`` bool: where this head's target is 1 (``tokens``: the tile's ``[1, bk]`` token
    flags of this head's group, or None without token heads)."""
    target = ((kind == DIAGONAL) & (cols - rows == offset)) | ((kind == FIRST) & (cols == 0))
    if tokens is not None:
        target = target | ((kind == TOKEN) & (tokens > 0))
    return target & (cols < static.n)


def _scores(q, k, bias):
    """``q kᵀ / sqrt(d) + bias`` of one tile, in float32."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return s * q.shape[-1] ** -0.5 + bias


def _keep(static, row_hash, cols):
    """The tile's keep flags (``row_hash``: its rows' ``[bq, L]`` hashes), or None."""
    if not static.dropout:
        return None
    return hashed_keep(_wide(row_hash, cols.shape[1]), cols, static.threshold)


def _dropped(static, keep, x):
    return x if keep is None else jnp.where(keep, x * static.keep_scale, 0.0)


def _forward_kernel(static: _Static, *refs):
    q_ref, k_ref, v_ref, bias_ref, *rest = refs
    tok_ref = rest.pop(0) if static.tokens else None
    hash_ref = rest.pop(0) if static.dropout else None
    o_ref, lse_ref, loss_ref, pull_ref = rest
    bq, bk, lanes = static.tiling.block_q, static.tiling.block_k, static.tiling.lanes
    kind, offset = _head(static)
    q = q_ref[...]
    row_hash = None if hash_ref is None else hash_ref[...]
    row0 = pl.program_id(2) * bq
    zeros = jnp.zeros((bq, 1), jnp.float32)

    def softmax_step(j, m, total, acc):
        start = pl.multiple_of(j * bk, bk)
        keys = pl.ds(start, bk)
        v = v_ref[keys, :]
        s = _scores(q, k_ref[keys, :], bias_ref[:, keys])
        rows, cols = _iotas(row0, start, s.shape)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m - m_new)
        e = jnp.exp(s - m_new)
        total = total * alpha + jnp.sum(e, axis=1, keepdims=True)
        dropped = _dropped(static, _keep(static, row_hash, cols), e)
        pv = jnp.dot(dropped.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return keys, rows, cols, m_new, alpha, e, dropped, total, acc * alpha + pv

    def plain_body(j, carry):
        m, total, acc = carry
        *_, m, _, _, _, total, acc = softmax_step(j, m, total, acc)
        return m, total, acc

    def guided_body(j, carry):
        m, total, acc, off, on1, on2 = carry
        keys, rows, cols, m, alpha, e, dropped, total, acc = softmax_step(j, m, total, acc)
        a = dropped if static.after_dropout else e
        tokens = None if tok_ref is None else tok_ref[:, keys]
        target = _target(static, kind, offset, tokens, rows, cols)
        squares = a * a
        off = off * alpha * alpha + jnp.sum(jnp.where(target, 0.0, squares), 1, keepdims=True)
        on1 = on1 * alpha + jnp.sum(jnp.where(target, a, 0.0), 1, keepdims=True)
        if static.tokens:  # with at most one target per row, on2 = on1² (added below)
            on2 = on2 * alpha * alpha + jnp.sum(jnp.where(target, squares, 0.0), 1, keepdims=True)
        return m, total, acc, off, on1, on2

    init = (jnp.full((bq, 1), -jnp.inf, jnp.float32), zeros, jnp.zeros(o_ref.shape, jnp.float32))
    steps = k_ref.shape[0] // bk

    def plain():
        return (*jax.lax.fori_loop(0, steps, plain_body, init), zeros, zeros, zeros)

    def guided():
        return jax.lax.fori_loop(0, steps, guided_body, (*init, zeros, zeros, zeros))

    if static.guided:  # this program's head decides whether it needs the statistics
        m, total, acc, off, on1, on2 = jax.lax.cond(kind != NONE, guided, plain)
    else:
        m, total, acc, *_ = plain()
    o_ref[...] = (acc / total).astype(o_ref.dtype)
    lse_ref[...] = _narrow(m + jnp.log(total), lanes)
    if not static.guided:
        loss_ref[...] = _narrow(zeros, lanes)
        pull_ref[...] = _narrow(zeros, lanes)
        return
    rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    inside = (rows + offset >= 0) & (rows + offset < static.n)
    count = (((kind == DIAGONAL) & inside) | (kind == FIRST)).astype(jnp.float32)
    if tok_ref is not None:  # a token head's rows all have the example's token count
        count = jnp.where(kind == TOKEN, jnp.sum(tok_ref[...]), count)
    on_sum, off = on1 / total, off / (total * total)
    on_squares = on2 / (total * total) if static.tokens else on_sum * on_sum
    several = count > 1.0
    loss = off + (on_sum - 1.0) ** 2 + (count - 1.0)
    loss = loss + jnp.where(several, on_squares - on_sum * on_sum, 0.0)
    pull = off + jnp.where(several, on_squares - on_sum, on_sum * (on_sum - 1.0))
    keep = (rows < static.n) & (kind != NONE)
    loss_ref[...] = _narrow(jnp.where(keep, loss, 0.0), lanes)
    pull_ref[...] = _narrow(jnp.where(keep, pull, 0.0), lanes)


def _d_scores(static, kind, offset, tokens, row_hash, q, k, v, bias, lse, d_out, row_term, c,
              rows, cols):  # fmt: skip
    """``dS`` of one ``[bq, bk]`` tile (before the ``1/sqrt(d)`` scale) and its (dropped)
    probabilities, which multiply ``dO`` into ``dV``."""
    width = cols.shape[1]
    probs = jnp.exp(_scores(q, k, bias) - _wide(lse, width))
    keep = _keep(static, row_hash, cols)
    d_dropped = jax.lax.dot_general(
        d_out, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )
    d_probs = _dropped(static, keep, d_dropped)
    dropped = _dropped(static, keep, probs)
    if static.guided:

        def pull() -> jax.Array:
            target = _target(static, kind, offset, tokens, rows, cols).astype(jnp.float32)
            a = dropped if static.after_dropout else probs
            pulled = 2.0 * _wide(c, width) * (a - target)
            return d_probs + (_dropped(static, keep, pulled) if static.after_dropout else pulled)

        d_probs = jax.lax.cond(kind != NONE, pull, lambda: d_probs)
    return probs * (d_probs - _wide(row_term, width)), dropped


def _dq_kernel(static: _Static, *refs):
    q_ref, k_ref, v_ref, bias_ref, *rest = refs
    tok_ref = rest.pop(0) if static.tokens else None
    hash_ref = rest.pop(0) if static.dropout else None
    lse_ref, do_ref, d_ref, c_ref, dq_ref = rest
    bq, bk = static.tiling.block_q, static.tiling.block_k
    kind, offset = _head(static)
    q, lse, d_out, row_term, c = q_ref[...], lse_ref[...], do_ref[...], d_ref[...], c_ref[...]
    row_hash = None if hash_ref is None else hash_ref[...]
    row0 = pl.program_id(2) * bq

    def body(j, dq):
        start = pl.multiple_of(j * bk, bk)
        keys = pl.ds(start, bk)
        k = k_ref[keys, :]
        tokens = None if tok_ref is None else tok_ref[:, keys]
        rows, cols = _iotas(row0, start, (bq, bk))
        ds, _ = _d_scores(
            static, kind, offset, tokens, row_hash, q, k, v_ref[keys, :], bias_ref[:, keys],
            lse, d_out, row_term, c, rows, cols,
        )  # fmt: skip
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = jax.lax.fori_loop(0, k_ref.shape[0] // bk, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * q.shape[-1] ** -0.5).astype(dq_ref.dtype)


def _dkv_kernel(static: _Static, *refs):
    q_ref, k_ref, v_ref, bias_ref, *rest = refs
    tok_ref = rest.pop(0) if static.tokens else None
    hash_ref = rest.pop(0) if static.dropout else None
    lse_ref, do_ref, d_ref, c_ref, dk_ref, dv_ref = rest
    bq, bk = static.tiling.block_q, static.tiling.block_k
    kind, offset = _head(static)
    k, v, bias = k_ref[...], v_ref[...], bias_ref[...]
    tokens = None if tok_ref is None else tok_ref[...]
    col0 = pl.program_id(2) * bk

    def body(i, carry):
        dk, dv = carry
        start = pl.multiple_of(i * bq, bq)
        queries = pl.ds(start, bq)
        q, d_out = q_ref[queries, :], do_ref[queries, :]
        row_hash = None if hash_ref is None else hash_ref[queries, :]
        rows, cols = _iotas(start, col0, (bq, bk))
        ds, dropped = _d_scores(
            static, kind, offset, tokens, row_hash, q, k, v, bias, lse_ref[queries, :],
            d_out, d_ref[queries, :], c_ref[queries, :], rows, cols,
        )  # fmt: skip
        transposed = (((0,), (0,)), ((), ()))
        dv = dv + jax.lax.dot_general(
            dropped.astype(d_out.dtype), d_out, transposed, preferred_element_type=jnp.float32
        )
        dk = dk + jax.lax.dot_general(
            ds.astype(q.dtype), q, transposed, preferred_element_type=jnp.float32
        )
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, q_ref.shape[0] // bq, body, (zeros, zeros))
    dk_ref[...] = (dk * k.shape[-1] ** -0.5).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- block specs


class _Specs:
    """Block specs over the kernels' arrays, for a grid ``(batch, head, block)`` whose blocks
    are query blocks (``side="q"``) or key blocks (``side="k"``)."""

    def __init__(self, static: _Static, n: int, d: int, side: str):
        self.static, self.n, self.d = static, n, d
        tiling = static.tiling
        self.block = tiling.block_q if side == "q" else tiling.block_k
        self.lanes = tiling.lanes
        self.side = side

    def seq(self, own: bool) -> pl.BlockSpec:  # [B, H, n, d]
        if own:
            return pl.BlockSpec((None, None, self.block, self.d), lambda b, h, i: (b, h, i, 0))
        return pl.BlockSpec((None, None, self.n, self.d), lambda b, h, i: (b, h, 0, 0))

    def rows(self, own: bool) -> pl.BlockSpec:  # [B, H, n, L]
        if own:
            return pl.BlockSpec((None, None, self.block, self.lanes), lambda b, h, i: (b, h, i, 0))
        return pl.BlockSpec((None, None, self.n, self.lanes), lambda b, h, i: (b, h, 0, 0))

    def bias(self, own: bool) -> pl.BlockSpec:  # [B, 1, n]
        if own:
            return pl.BlockSpec((None, 1, self.block), lambda b, h, i: (b, 0, i))
        return pl.BlockSpec((None, 1, self.n), lambda b, h, i: (b, 0, 0))

    def tokens(self, own: bool) -> pl.BlockSpec:  # [B, G, 1, n]: the program's head's group
        groups = [group for _, _, group in self.static.heads]
        if own:
            return pl.BlockSpec(
                (None, None, 1, self.block), lambda b, h, i: (b, _head_value(h, groups), 0, i)
            )
        return pl.BlockSpec(
            (None, None, 1, self.n), lambda b, h, i: (b, _head_value(h, groups), 0, 0)
        )

    def inputs(self) -> list[pl.BlockSpec]:
        """q, k, v, bias[, tokens][, row hashes]: each program's own block of its side."""
        q_side = self.side == "q"
        specs = [self.seq(q_side), self.seq(not q_side), self.seq(not q_side)]
        specs.append(self.bias(not q_side))
        if self.static.tokens:
            specs.append(self.tokens(not q_side))
        if self.static.dropout:
            specs.append(self.rows(q_side))
        return specs


def _call(static: _Static, kernel: Callable, name: str, grid, in_specs, out_specs, out_shape,
          *args):  # fmt: skip
    return pl.pallas_call(
        functools.partial(kernel, static),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=static.tiling.compiler is None,
        compiler_params=static.tiling.compiler,
        name=name,
    )(*args)


def _optional(static: _Static, tokens, hashes) -> tuple:
    return (*((tokens,) if static.tokens else ()), *((hashes,) if static.dropout else ()))


def _forward(static: _Static, q, k, v, bias, tokens, hashes):
    batch, heads, n, d = q.shape
    tiling = static.tiling
    specs = _Specs(static, n, d, "q")
    rows = jax.ShapeDtypeStruct((batch, heads, n, tiling.lanes), jnp.float32)
    return _call(
        static,
        _forward_kernel,
        "guided_attention_forward",
        (batch, heads, n // tiling.block_q),
        specs.inputs(),
        [specs.seq(True), specs.rows(True), specs.rows(True), specs.rows(True)],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), rows, rows, rows],
        q, k, v, bias, *_optional(static, tokens, hashes),
    )  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(static, q, k, v, bias, tokens, hashes):
    out, _, loss, _ = _forward(static, q, k, v, bias, tokens, hashes)
    return out, jnp.sum(loss[..., 0], axis=(0, 2))


def _attention_fwd(static, q, k, v, bias, tokens, hashes):
    out, lse, loss, pull = _forward(static, q, k, v, bias, tokens, hashes)
    residuals = (q, k, v, bias, tokens, hashes, out, lse, pull)
    return (out, jnp.sum(loss[..., 0], axis=(0, 2))), residuals


def _attention_bwd(static, residuals, cotangents):
    q, k, v, bias, tokens, hashes, out, lse, pull = residuals
    d_out, d_head_sums = cotangents
    batch, heads, n, d = q.shape
    tiling = static.tiling
    # Row terms [B, H, n, L]: D = rowsum(dO ⊙ O) + 2c Σ_j a_j (a_j - P_j).
    row_term = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)[..., None]
    c = jnp.zeros((batch, heads, n, 1), jnp.float32)
    if static.guided:
        guided = jnp.asarray([kind != NONE for kind, _, _ in static.heads])[:, None]
        valid = guided & (jnp.arange(n) < static.n)[None, :]
        c = jnp.where(valid, d_head_sums.astype(jnp.float32)[:, None], 0.0)[None, ..., None]
        c = jnp.broadcast_to(c, (batch, heads, n, 1))
        row_term = row_term + 2.0 * c * pull[..., :1]
    row_term = jnp.broadcast_to(row_term, (batch, heads, n, tiling.lanes))
    c = jnp.broadcast_to(c, (batch, heads, n, tiling.lanes))
    extra = (lse, d_out.astype(q.dtype), row_term, c)
    args = (q, k, v, bias, *_optional(static, tokens, hashes), *extra)
    by_q = _Specs(static, n, d, "q")
    dq = _call(
        static,
        _dq_kernel,
        "guided_attention_dq",
        (batch, heads, n // tiling.block_q),
        [*by_q.inputs(), by_q.rows(True), by_q.seq(True), by_q.rows(True), by_q.rows(True)],
        by_q.seq(True),
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        *args,
    )
    by_k = _Specs(static, n, d, "k")
    dk, dv = _call(
        static,
        _dkv_kernel,
        "guided_attention_dkv",
        (batch, heads, n // tiling.block_k),
        [*by_k.inputs(), by_k.rows(False), by_k.seq(False), by_k.rows(False), by_k.rows(False)],
        [by_k.seq(True), by_k.seq(True)],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        *args,
    )
    return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------- entry point


def _heads(spec: HeadSpec | None, num_heads: int) -> tuple[tuple[int, int, int], ...]:
    if spec is None:
        return ((NONE, 0, 0),) * num_heads
    patterns = HeadPatterns.from_spec(spec, num_heads)
    if USER in patterns.kind:
        raise ValueError(
            f"the Pallas kernels score the built-in patterns only, not registered ones "
            f"{list(patterns.user)}; use model.attention='flash' or 'dense'"
        )
    return tuple(zip(patterns.kind, patterns.offset, patterns.token_group, strict=True))


def _run(tiling: Tiling, q, k, v, key_mask, token_masks, hashes, *, heads, threshold, scale,
         after_dropout):  # fmt: skip
    """The kernels with ``tiling`` on the arrays one device holds: ``[B, n, H, d]`` in and out,
    ``heads`` the static patterns of these ``H`` heads, ``hashes`` their rows' dropout hashes
    ``[B, H, n]`` (None: no dropout); returns the values and the per-head sums ``[H]``."""
    batch, n, num_heads, _ = q.shape
    block = max(tiling.block_q, tiling.block_k)
    padded = pl.cdiv(n, block) * block
    bias = key_bias(q, k, v, key_mask, padded)[:, None, :]  # [B, 1, n]
    q, k, v = (
        jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, padded - n), (0, 0))) for x in (q, k, v)
    )
    tokens = None
    has_tokens = any(kind == TOKEN for kind, _, _ in heads)
    if has_tokens:  # [T, B, n] -> [B, T, 1, padded]
        tokens = jnp.swapaxes(token_masks.astype(jnp.float32), 0, 1)[:, :, None, :]
        tokens = jnp.pad(tokens, ((0, 0), (0, 0), (0, 0), (0, padded - n)))
    if threshold:  # padded rows' hashes are never seen: their outputs and cotangents are cut
        hashes = jnp.pad(hashes, ((0, 0), (0, 0), (0, padded - n)))[..., None]
        hashes = jnp.broadcast_to(hashes, (batch, num_heads, padded, tiling.lanes))
    static = _Static(heads, has_tokens, threshold, scale, after_dropout, tiling, n)
    out, head_sums = _attention(static, q, k, v, bias, tokens, hashes)
    return jnp.swapaxes(out[:, :, :n], 1, 2), head_sums


def _on_each_device(local: Callable, heads, q, k, v, key_mask, token_masks, hashes):
    """Runs ``local(heads, ...)`` under ``jax.shard_map`` over the context mesh, because XLA
    cannot partition a Pallas call (Mosaic refuses one on several chips; a Triton call would be
    gathered whole onto each GPU).

    Examples split over the batch axes (``data x fsdp``) and heads over ``tensor``, wherever
    they divide (otherwise that axis computes redundantly). A device guides its own heads: its
    ``tensor`` index picks the static patterns of its slice of ``heads`` (one traced branch per
    distinct slice), and its per-head sums come back as one row per batch shard, in the global
    head order, summed here. The dropout hashes are computed for the global batch and heads
    before the split, so every device drops what one device would. Nothing inside
    communicates, so the gradient of the replicated axes is shard_map's own (its outputs'
    cotangents divided over the replicas, its inputs' summed)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(heads, q, k, v, key_mask, token_masks, hashes)
    batch, _, num_heads, _ = q.shape
    batch_size = batch_axes_size(mesh)
    split_batch = batch_size > 1 and batch % batch_size == 0
    tensor = mesh.shape.get("tensor", 1)
    split_heads = tensor > 1 and num_heads % tensor == 0
    rows = tuple(a for a in BATCH_AXES if a in mesh.shape) if split_batch else None
    cols = "tensor" if split_heads else None
    per_device = num_heads // tensor if split_heads else num_heads
    slices = [heads[i * per_device : (i + 1) * per_device] for i in range(num_heads // per_device)]
    distinct = list(dict.fromkeys(slices))

    def body(q, k, v, key_mask, token_masks, hashes):
        def branch(index: int) -> Callable:
            return lambda *args: local(distinct[index], *args)

        args = (q, k, v, key_mask, token_masks, hashes)
        if len(distinct) == 1:
            out, sums = branch(0)(*args)
        else:  # this device's slice of heads, as an index into the distinct slices
            which = jnp.asarray([distinct.index(s) for s in slices], jnp.int32)
            index = which[jax.lax.axis_index("tensor")]
            out, sums = jax.lax.switch(index, [branch(i) for i in range(len(distinct))], *args)
        return out, sums[None]

    seq = P(rows, None, cols, None)
    in_specs = (seq, seq, seq, P(rows, None), P(None, rows, None), P(rows, cols, None))
    out, sums = jax.shard_map(
        body, in_specs=in_specs, out_specs=(seq, P(rows, cols)), check_vma=False
    )(q, k, v, key_mask, token_masks, hashes)
    return out, jnp.sum(sums, axis=0)


def pallas_attention(
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
    tiling: Tiling | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Same contract as :func:`guided_jax.kernels.flash.flash_attention` (``[B, n, H, d]``
    values and, with a ``spec``, each head's summed squared error ``[H]``), with the hashed
    dropout masks of :mod:`guided_jax.kernels.dropout`; per-document masks are refused.

    ``tiling`` fixes one backend's settings (e.g. the TPU's, interpreted, in tests); by
    default each lowering platform gets its own (:func:`default_tiling`), and a CPU runs the
    kernels interpreted."""
    if segment_ids is not None:
        raise ValueError(
            "model.attention='pallas' applies no per-document attention masks; set "
            "data.document_masks=false or use model.attention='flash'"
        )
    heads = _heads(spec, q.shape[2])
    has_tokens = any(kind == TOKEN for kind, _, _ in heads)
    if has_tokens and token_masks is None:
        raise ValueError("guided token-set heads need token_masks")
    threshold = hash_threshold(float(dropout_rate)) if dropout_key is not None else 0
    batch, n, num_heads, _ = q.shape
    hashes = row_hashes(dropout_key, batch, num_heads, n) if threshold else None
    if not has_tokens:
        token_masks = None
    if tiling is None and _TRACED_FOR.get() is not None:
        tiling = default_tiling(_TRACED_FOR.get(), q.dtype)
    options = dict(
        threshold=threshold,
        scale=hash_keep_scale(float(dropout_rate)) if threshold else 1.0,
        after_dropout=after_dropout,
    )

    def local(heads, *args):
        run = functools.partial(_run, heads=heads, **options)
        if tiling is not None:
            return run(tiling, *args)
        return jax.lax.platform_dependent(
            *args,
            tpu=functools.partial(run, default_tiling("tpu", q.dtype)),
            cuda=functools.partial(run, default_tiling("cuda", q.dtype)),
            default=functools.partial(run, default_tiling("cpu", q.dtype)),
        )

    out, head_sums = _on_each_device(local, heads, q, k, v, key_mask, token_masks, hashes)
    return out, (head_sums if spec is not None else None)
