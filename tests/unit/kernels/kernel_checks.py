"""Shared checks of the attention kernels (guided_jax.kernels): random inputs, the dense
composition they are compared with, a float64 numpy implementation of every head's target and
squared error, and the comparison of values, losses and gradients."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from guided_jax.guidance import HeadSpec, group_losses, losses_from_head_sums, token_masks
from guided_jax.kernels import KERNELS
from guided_jax.kernels.dense import attention_bias, attention_probs
from guided_jax.kernels.dropout import keep_scale

BATCH, HEADS, HEAD_DIM = 2, 8, 8
# Every pattern type, two heads of one group, and two unguided heads at the end.
SPEC = HeadSpec.parse("self:1,next:1,prev:1,first:2,token[7]:1")
TOKEN_ID = 7


def kernel_inputs(n: int, padded: bool, seed: int = 0, token_ids: Sequence[int] = (TOKEN_ID,)):
    """``q, k, v`` ``[B, n, H, d]``, the key mask (the second example's last 5 keys hidden when
    ``padded``) and the token masks of ``token_ids`` for ids drawn from ``0..11``."""
    q, k, v, key_mask, ids = kernel_arrays(n, padded, seed)
    return q, k, v, key_mask, token_masks(ids, list(token_ids))


def kernel_arrays(n: int, padded: bool, seed: int = 0):
    """``q, k, v``, the key mask and the ``[B, n]`` token ids of :func:`kernel_inputs`."""
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v = (jax.random.normal(key, (BATCH, n, HEADS, HEAD_DIM)) for key in keys[:3])
    ids = jax.random.randint(keys[3], (BATCH, n), 0, 12)
    lengths = jnp.array([n, n - 5 if padded else n])
    key_mask = jnp.arange(n)[None, :] < lengths[:, None]
    return q, k, v, key_mask, ids


def dense_reference(q, k, v, key_mask, masks, *, keep, rate, after_dropout, spec=SPEC, scale=None):
    """Values and per-group losses from the full maps (``keep``: a dropout keep mask or None,
    its kept values scaled by ``scale``, by default that of guided_jax.kernels.dropout)."""
    probs = attention_probs(q, k, attention_bias(key_mask))
    scale = keep_scale(rate) if scale is None else scale
    dropped = probs if keep is None else probs * keep * scale
    out = jnp.einsum("bhqk,bkhd->bqhd", dropped, v)
    return out, group_losses(dropped if after_dropout else probs, spec, masks)


def kernel_losses(kind: str, q, k, v, key_mask, masks, *, spec=SPEC, **options):
    """Values and per-group losses of kernel ``kind`` (``options``: its keyword arguments)."""
    out, head_sums = KERNELS[kind](q, k, v, key_mask, spec=spec, token_masks=masks, **options)
    return out, losses_from_head_sums(head_sums, spec, q.shape[0], q.shape[1])


def objective(attention: Callable) -> Callable:
    """Weighs the output and every group's loss differently, so each gradient path counts."""

    def weighted(q, k, v):
        out, losses = attention(q, k, v)
        return jnp.sum(out * jnp.cos(out)) + 50.0 * jnp.sum(
            losses * jnp.arange(1, losses.shape[0] + 1)
        )

    return weighted


def assert_kernels_agree(kernel: Callable, dense: Callable, q, k, v) -> None:
    """Values, (positive) per-group losses and gradients of ``kernel`` equal ``dense``'s."""
    want_out, want_losses = jax.jit(dense)(q, k, v)
    got_out, got_losses = jax.jit(kernel)(q, k, v)
    np.testing.assert_allclose(got_out, want_out, atol=1e-5)
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(want_losses) > 0)
    want_grads = jax.jit(jax.grad(objective(dense), argnums=(0, 1, 2)))(q, k, v)
    got_grads = jax.jit(jax.grad(objective(kernel), argnums=(0, 1, 2)))(q, k, v)
    for name, got, want in zip("qkv", got_grads, want_grads, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"d{name}")


# ----------------------------------------------------------------------------- numpy reference

# A head's target, written by hand per head: a positional pattern's name, a token id (a token
# set), an ``[n, n]`` array (a registered pattern's target), or None (unguided).
HeadTarget = str | int | np.ndarray | None


def numpy_targets(heads: Sequence[HeadTarget], ids: np.ndarray) -> np.ndarray:
    """``[B, H, n, n]`` float64 targets, one per head, built entry by entry from the head list."""
    batch, n = ids.shape
    targets = np.zeros((batch, len(heads), n, n))
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    for h, head in enumerate(heads):
        if head is None:
            continue
        if isinstance(head, np.ndarray):
            targets[:, h] = head
        elif isinstance(head, int):  # every row: the columns where the token is, per example
            targets[:, h] = (ids == head)[:, None, :]
        else:
            offset = {"self": 0, "next": 1, "prev": -1}.get(head)
            targets[:, h] = (cols == 0) if head == "first" else (cols - rows == offset)
    return targets


def numpy_probs(q, k, key_mask) -> np.ndarray:
    """``softmax(q k^T / sqrt(d))`` over the visible keys, ``[B, H, n, n]`` in float64."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.asarray(key_mask)[:, None, None, :], scores, -np.inf)
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def numpy_head_sums(
    q, k, key_mask, heads: Sequence[HeadTarget], ids, weights, keep: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each head's ``Σ (a - P)²`` over batch, queries and keys (``[H]``, 0 for unguided heads)
    with the targets of :func:`numpy_targets`, and the gradients of ``Σ_h weights[h] · sum[h]``
    with respect to ``q`` and ``k``, all in float64. ``keep``: dropout's scaled keep mask
    ``[B, H, n, n]``, applied to the maps the loss sees."""
    q64, k64 = np.asarray(q, np.float64), np.asarray(k, np.float64)
    guided = np.array([head is not None for head in heads])
    probs = numpy_probs(q, k, key_mask)
    a = probs if keep is None else probs * keep
    diff = np.where(guided[None, :, None, None], a - numpy_targets(heads, np.asarray(ids)), 0.0)
    sums = np.sum(diff**2, axis=(0, 2, 3))
    d_a = 2.0 * diff * np.asarray(weights, np.float64)[None, :, None, None]
    d_probs = d_a if keep is None else d_a * keep
    d_scores = probs * (d_probs - np.sum(d_probs * probs, axis=-1, keepdims=True))
    d_scores /= np.sqrt(q64.shape[-1])
    dq = np.einsum("bhqk,bkhd->bqhd", d_scores, k64)
    dk = np.einsum("bhqk,bqhd->bkhd", d_scores, q64)
    return sums, dq, dk
