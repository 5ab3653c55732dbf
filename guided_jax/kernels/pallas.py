"""Guided flash attention as Pallas kernels (GPU via Triton, TPU via Mosaic; ``interpret=True``
runs them anywhere, which is how the tests check them on CPU).

The same algorithm as :mod:`guided_jax.kernels.flash` (read its docstring for the math), cut
into three kernels over a ``(batch, head, block)`` grid, each program holding one block of queries
or keys in fast memory and walking over the other side:

* forward: per query block, the online softmax plus the guidance row sums → ``O``, ``log Σ e``
  and each row's loss and ``Σ_j a_j (a_j - P_j)``;
* ``dq``: per query block, walks the key blocks;
* ``dk, dv``: per key block, walks the query blocks.

The per-row guidance cotangent ``c`` (zero for unguided heads and padded rows) enters the
backward as ``dA += 2c(a - P)`` and in the row term ``D``. These kernels apply no attention
dropout (no random bits are shared by both backends): ``model.attention="pallas"`` needs
``model.attention_dropout=0``; the portable ``flash`` kernel draws its masks per block instead.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from guided_jax.guidance import HeadSpec
from guided_jax.kernels.targets import (
    DIAGONAL,
    FIRST,
    NONE,
    TOKEN,
    HeadPatterns,
    head_token_masks,
    key_bias,
    target_counts,
)


@dataclasses.dataclass(frozen=True)
class _Static:
    guided: bool
    tokens: bool  # some head targets token columns: a row may have several targets
    block: int
    n: int  # true length; the arrays are padded to a multiple of ``block``
    interpret: bool


def _target(kind, offset, tokens, rows, cols, n):
    """``[bq, bk]`` bool target of one head for query ``rows`` and key ``cols``."""
    rows, cols = rows[:, None], cols[None, :]
    target = ((kind == DIAGONAL) & (cols - rows == offset)) | ((kind == FIRST) & (cols == 0))
    target = target | ((kind == TOKEN) & (tokens[None, :] > 0))
    return target & (cols < n)


def _tile_probs(q, k, bias, lse):
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    return jnp.exp(s + bias[None, :] - lse[:, None])


def _forward_kernel(
    static, kind_ref, offset_ref, q_ref, k_ref, v_ref, bias_ref, tok_ref, count_ref,
    o_ref, lse_ref, loss_ref, pull_ref,
):  # fmt: skip
    block, n = static.block, static.n
    i = pl.program_id(2)
    q = q_ref[...]
    rows = i * block + jax.lax.broadcasted_iota(jnp.int32, (block,), 0)
    kind, offset = kind_ref[0], offset_ref[0]
    zeros = jnp.zeros((block,), jnp.float32)
    steps = k_ref.shape[0] // block

    def softmax_step(j, m, total, acc):
        keys = pl.ds(j * block, block)
        k, v, bias = k_ref[keys, :], v_ref[keys, :], bias_ref[keys]
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
        s = s + bias[None, :]
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        e = jnp.exp(s - m_new[:, None])
        total = total * alpha + jnp.sum(e, axis=1)
        pv = jnp.dot(e.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return keys, m_new, alpha, e, total, acc * alpha[:, None] + pv

    def plain_body(j, carry):
        _, m, _, _, total, acc = softmax_step(j, *carry)
        return m, total, acc

    def guided_body(j, carry):
        m, total, acc, off, on1, on2 = carry
        keys, m, alpha, e, total, acc = softmax_step(j, m, total, acc)
        cols = j * block + jax.lax.broadcasted_iota(jnp.int32, (block,), 0)
        target = _target(kind, offset, tok_ref[keys], rows, cols, n)
        squares = e * e
        off = off * alpha * alpha + jnp.sum(jnp.where(target, 0.0, squares), axis=1)
        on1 = on1 * alpha + jnp.sum(jnp.where(target, e, 0.0), axis=1)
        if static.tokens:  # with at most one target per row, on2 = on1² (added below)
            on2 = on2 * alpha * alpha + jnp.sum(jnp.where(target, squares, 0.0), axis=1)
        return m, total, acc, off, on1, on2

    init = (
        jnp.full((block,), -jnp.inf, jnp.float32),
        zeros,
        jnp.zeros((block, v_ref.shape[-1]), jnp.float32),
    )

    def plain():
        return (*jax.lax.fori_loop(0, steps, plain_body, init), zeros, zeros, zeros)

    def guided():
        return jax.lax.fori_loop(0, steps, guided_body, (*init, zeros, zeros, zeros))

    if static.guided:  # this program's head decides whether it needs the statistics
        m, total, acc, off, on1, on2 = jax.lax.cond(kind != NONE, guided, plain)
    else:
        m, total, acc, *_ = plain()
    o_ref[...] = (acc / total[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(total)
    if static.guided:
        count = count_ref[...]
        on_sum, off = on1 / total, off / (total * total)
        on_squares = on2 / (total * total) if static.tokens else on_sum * on_sum
        several = count > 1.0
        loss = off + (on_sum - 1.0) ** 2 + (count - 1.0)
        loss = loss + jnp.where(several, on_squares - on_sum * on_sum, 0.0)
        pull = off + jnp.where(several, on_squares - on_sum, on_sum * (on_sum - 1.0))
        keep = (rows < n) & (kind != NONE)
        loss_ref[...] = jnp.where(keep, loss, 0.0)
        pull_ref[...] = jnp.where(keep, pull, 0.0)
    else:
        loss_ref[...] = zeros
        pull_ref[...] = zeros


def _d_scores(static, kind, offset, tokens, q, k, v, bias, lse, d_out, row_term, c, rows, cols):
    """``dS`` of one ``[bq, bk]`` tile (before the ``1/sqrt(d)`` scale) and its probabilities."""
    probs = _tile_probs(q, k, bias, lse)
    d_probs = jnp.dot(d_out, v.T, preferred_element_type=jnp.float32)
    if static.guided:

        def pull() -> jax.Array:
            target = _target(kind, offset, tokens, rows, cols, static.n).astype(jnp.float32)
            return d_probs + 2.0 * c[:, None] * (probs - target)

        d_probs = jax.lax.cond(kind != NONE, pull, lambda: d_probs)
    return probs * (d_probs - row_term[:, None]), probs


def _dq_kernel(
    static, kind_ref, offset_ref, q_ref, k_ref, v_ref, bias_ref, tok_ref,
    lse_ref, do_ref, d_ref, c_ref, dq_ref,
):  # fmt: skip
    block = static.block
    i = pl.program_id(2)
    q, lse, d_out, row_term, c = q_ref[...], lse_ref[...], do_ref[...], d_ref[...], c_ref[...]
    rows = i * block + jax.lax.broadcasted_iota(jnp.int32, (block,), 0)

    def body(j, dq):
        keys = pl.ds(j * block, block)
        cols = j * block + jax.lax.broadcasted_iota(jnp.int32, (block,), 0)
        k = k_ref[keys, :]
        ds, _ = _d_scores(
            static, kind_ref[0], offset_ref[0], tok_ref[keys], q, k, v_ref[keys, :],
            bias_ref[keys], lse, d_out, row_term, c, rows, cols,
        )  # fmt: skip
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = jax.lax.fori_loop(0, k_ref.shape[0] // block, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * q.shape[-1] ** -0.5).astype(dq_ref.dtype)


def _dkv_kernel(
    static, kind_ref, offset_ref, q_ref, k_ref, v_ref, bias_ref, tok_ref,
    lse_ref, do_ref, d_ref, c_ref, dk_ref, dv_ref,
):  # fmt: skip
    block = static.block
    j = pl.program_id(2)
    k, v, bias = k_ref[...], v_ref[...], bias_ref[...]
    cols = j * block + jax.lax.broadcasted_iota(jnp.int32, (block,), 0)
    tokens = tok_ref[...]

    def body(i, carry):
        dk, dv = carry
        queries = pl.ds(i * block, block)
        rows = i * block + jax.lax.broadcasted_iota(jnp.int32, (block,), 0)
        q, d_out = q_ref[queries, :], do_ref[queries, :]
        ds, probs = _d_scores(
            static, kind_ref[0], offset_ref[0], tokens, q, k, v, bias, lse_ref[queries],
            d_out, d_ref[queries], c_ref[queries], rows, cols,
        )  # fmt: skip
        dv = dv + jnp.dot(probs.astype(d_out.dtype).T, d_out, preferred_element_type=jnp.float32)
        dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, q_ref.shape[0] // block, body, (zeros, zeros))
    dk_ref[...] = (dk * k.shape[-1] ** -0.5).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# Block specs over [B, n, H, d] arrays, [B, H, n] row arrays, [B, n] key arrays, [H] head arrays.
def _seq_block(block, d):
    return pl.BlockSpec((None, block, None, d), lambda b, h, i: (b, i, h, 0))


def _seq_whole(n, d):
    return pl.BlockSpec((None, n, None, d), lambda b, h, i: (b, 0, h, 0))


def _rows_block(block):
    return pl.BlockSpec((None, None, block), lambda b, h, i: (b, h, i))


def _rows_whole(n):
    return pl.BlockSpec((None, None, n), lambda b, h, i: (b, h, 0))


def _head_scalar():
    return pl.BlockSpec((1,), lambda b, h, i: (h,))


def _call(static, kernel, grid, in_specs, out_specs, out_shape, *args):
    return pl.pallas_call(
        functools.partial(kernel, static),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=static.interpret,
    )(*args)


def _full_block_specs(d, n):
    """Head scalars, then q, k, v, bias, tokens, each whole over the sequence (the dkv/dq
    kernels pick their own block of one side)."""
    return [
        _head_scalar(),
        _head_scalar(),
        _seq_whole(n, d),
        _seq_whole(n, d),
        _seq_whole(n, d),
        pl.BlockSpec((None, n), lambda b, h, i: (b, 0)),
        _rows_whole(n),
    ]


def _forward(static, kind, offset, q, k, v, bias, tokens, counts):
    batch, n, heads, d = q.shape
    block = static.block
    grid = (batch, heads, n // block)
    in_specs = _full_block_specs(d, n)
    in_specs[2] = _seq_block(block, d)  # q: this program's block
    in_specs.append(_rows_block(block))  # the target counts of its rows
    rows = jax.ShapeDtypeStruct((batch, heads, n), jnp.float32)
    return _call(
        static,
        _forward_kernel,
        grid,
        in_specs,
        [_seq_block(block, d), _rows_block(block), _rows_block(block), _rows_block(block)],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), rows, rows, rows],
        kind, offset, q, k, v, bias, tokens, counts,
    )  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(static, kind, offset, q, k, v, bias, tokens, counts):
    out, _, loss, _ = _forward(static, kind, offset, q, k, v, bias, tokens, counts)
    return out, jnp.sum(loss, axis=(0, 2))


def _attention_fwd(static, kind, offset, q, k, v, bias, tokens, counts):
    out, lse, loss, pull = _forward(static, kind, offset, q, k, v, bias, tokens, counts)
    return (out, jnp.sum(loss, axis=(0, 2))), (kind, offset, q, k, v, bias, tokens, out, lse, pull)


def _attention_bwd(static, res, cotangents):
    kind, offset, q, k, v, bias, tokens, out, lse, pull = res
    d_out, d_head_sums = cotangents
    batch, n, heads, d = q.shape
    block = static.block
    # Row terms [B, H, n]: D = rowsum(dO ⊙ O) + 2c Σ_j a_j (a_j - P_j).
    d_out32, out32 = d_out.astype(jnp.float32), out.astype(jnp.float32)
    row_term = jnp.swapaxes(jnp.sum(d_out32 * out32, axis=-1), 1, 2)
    valid = (jnp.arange(n) < static.n)[None, None, :]
    c = jnp.zeros((batch, heads, n), jnp.float32)
    if static.guided:
        c = jnp.where(valid, d_head_sums.astype(jnp.float32)[None, :, None], 0.0)
        row_term = row_term + 2.0 * c * pull
    grid = (batch, heads, n // block)
    base = _full_block_specs(d, n)
    extra = [_rows_whole(n), _seq_whole(n, d), _rows_whole(n), _rows_whole(n)]
    args = (kind, offset, q, k, v, bias, tokens, lse, d_out.astype(q.dtype), row_term, c)
    dq_specs = base + extra
    dq_specs[2], dq_specs[7:] = _seq_block(block, d), [
        _rows_block(block), _seq_block(block, d), _rows_block(block), _rows_block(block),
    ]  # fmt: skip
    dq = _call(static, _dq_kernel, grid, dq_specs, _seq_block(block, d),
               jax.ShapeDtypeStruct(q.shape, q.dtype), *args)  # fmt: skip
    dkv_specs = base + extra
    dkv_specs[3], dkv_specs[4] = _seq_block(block, d), _seq_block(block, d)
    dkv_specs[5] = pl.BlockSpec((None, block), lambda b, h, j: (b, j))
    dkv_specs[6] = _rows_block(block)
    dk, dv = _call(
        static, _dkv_kernel, grid, dkv_specs, [_seq_block(block, d), _seq_block(block, d)],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)], *args,
    )  # fmt: skip
    return None, None, dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


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
    block: int | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Same contract as :func:`guided_jax.kernels.flash.flash_attention`, without dropout and
    per-document masks (asking for either is an error): ``[B, n, H, d]`` values and, with a
    ``spec``, each head's summed squared error ``[H]``. ``after_dropout`` has nothing to choose.

    ``block`` (rows and keys per tile) defaults to 128 for 16-bit inputs and 64 for float32,
    whose tiles of 128 ask Triton for more shared memory than an H100 has (RESULTS.md).
    ``interpret`` defaults to running the kernels interpreted on a CPU backend."""
    del after_dropout  # no dropout: the maps before and after it are the same
    if segment_ids is not None:
        raise ValueError(
            "model.attention='pallas' applies no per-document attention masks; set "
            "data.document_masks=false or use model.attention='flash'"
        )
    if dropout_key is not None and dropout_rate > 0.0:
        raise ValueError(
            "model.attention='pallas' applies no attention dropout; set "
            "model.attention_dropout=0 or use model.attention='flash'"
        )
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    patterns = None if spec is None else HeadPatterns.from_spec(spec, q.shape[2])
    batch, n, heads, _ = q.shape
    if block is None:
        block = 128 if jnp.dtype(q.dtype).itemsize <= 2 else 64
    block = min(block, pl.next_power_of_2(n))
    padded = pl.cdiv(n, block) * block
    bias = key_bias(q, k, v, key_mask, padded)
    pad = padded - n
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    guided = patterns is not None
    if guided and patterns.user:
        raise ValueError(
            f"the Pallas kernels score the built-in patterns only, not registered ones "
            f"{list(patterns.user)}; use model.attention='flash' or 'dense'"
        )
    if guided:
        kind = np.asarray(patterns.kind, np.int32)
        offset = np.asarray(patterns.offset, np.int32)
    else:
        kind, offset = np.zeros(heads, np.int32), np.zeros(heads, np.int32)
    head_tokens = head_token_masks(patterns, token_masks, padded)
    tokens = jnp.zeros((batch, heads, padded), jnp.float32) if head_tokens is None else head_tokens
    counts = jnp.zeros((batch, heads, padded), jnp.float32)  # targets per row
    if guided:
        per_row = target_counts(patterns, head_tokens, n)
        counts = counts.at[:, :, :n].add(per_row)
    static = _Static(guided, guided and TOKEN in patterns.kind, block, n, interpret)
    out, head_sums = _attention(static, jnp.asarray(kind), jnp.asarray(offset), q, k, v, bias,
                                tokens, counts)  # fmt: skip
    return out[:, :n], (head_sums if guided else None)
