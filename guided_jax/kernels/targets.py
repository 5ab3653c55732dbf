"""What the blockwise kernels compare each tile against: per-head pattern codes and the
target predicates, counts and key layouts that the portable ``flash`` kernel and the Pallas
kernels share.

A guided head's target is a 0/1 predicate on (query row, key column): a diagonal at an offset
(``self``, ``next``, ``prev``), the first column (``first``), the columns where a token sits
(token sets), or the nonzeros of a registered pattern's constant target. :class:`HeadPatterns`
lays a layer's spec out per head, so a kernel evaluates the predicate of any tile from iotas.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from guided_jax.guidance import HeadSpec, pattern_target

# Per-head pattern codes.
NONE, DIAGONAL, FIRST, TOKEN, USER = 0, 1, 2, 3, 4
NEG = float(jnp.finfo(jnp.float32).min)  # the bias of a hidden key
DIAGONAL_OFFSETS = {"self": 0, "next": 1, "prev": -1}


@dataclasses.dataclass(frozen=True)
class HeadPatterns:
    """Static per-head description of the targets: what the kernel compares ``(row, col)``
    against. ``token_group[h]`` indexes the token masks for token-set heads."""

    kind: tuple[int, ...]
    offset: tuple[int, ...]
    token_group: tuple[int, ...]
    user: tuple[str, ...] = ()  # registered patterns' names; user_index[h] indexes them
    user_index: tuple[int, ...] = ()

    @classmethod
    def from_spec(cls, spec: HeadSpec, num_heads: int) -> HeadPatterns:
        kind, offset, token = [NONE] * num_heads, [0] * num_heads, [0] * num_heads
        user, user_index = list(spec.user_patterns), [0] * num_heads
        token_index = 0
        for group, (lo, hi) in zip(spec.groups, spec.head_ranges, strict=True):
            for h in range(lo, hi):
                if group.pattern in DIAGONAL_OFFSETS:
                    kind[h], offset[h] = DIAGONAL, DIAGONAL_OFFSETS[group.pattern]
                elif group.pattern == "first":
                    kind[h] = FIRST
                elif group.is_user:
                    kind[h], user_index[h] = USER, user.index(group.pattern)
                else:
                    kind[h], token[h] = TOKEN, token_index
            token_index += group.pattern == "token"
        if not user:
            return cls(tuple(kind), tuple(offset), tuple(token))
        return cls(tuple(kind), tuple(offset), tuple(token), tuple(user), tuple(user_index))


def user_targets(patterns: HeadPatterns, n: int, padded: int) -> jax.Array | None:
    """``[U, n, padded]`` constant: the registered patterns' targets, key columns padded."""
    if not patterns.user:
        return None
    targets = np.zeros((len(patterns.user), n, padded), np.float32)
    for index, name in enumerate(patterns.user):
        targets[index, :, :n] = pattern_target(name, n)
    return jnp.asarray(targets)


def user_tile(
    patterns: HeadPatterns, user: jax.Array | None, j: jax.Array, block: int
) -> jax.Array | None:
    """``[1, H, n, block]`` target values of key block ``j`` for registered-pattern heads (0
    for the other heads), or None without such heads."""
    if user is None:
        return None
    tile = jax.lax.dynamic_slice_in_dim(user, j * block, block, axis=2)  # [U, n, block]
    tile = jnp.take(tile, np.asarray(patterns.user_index), axis=0)  # [H, n, block]
    is_user = (np.asarray(patterns.kind) == USER)[:, None, None]
    return jnp.where(is_user, tile, 0.0)[None]


def user_weights(patterns: HeadPatterns, tile: jax.Array) -> jax.Array:
    """Target values of a tile where the target is nonzero: ``P`` for registered patterns, 1
    for the built-in ones."""
    return jnp.where((np.asarray(patterns.kind) == USER)[:, None, None], tile, 1.0)


def target_tile(
    patterns: HeadPatterns,
    head_tokens: jax.Array | None,
    rows: int,
    cols: jax.Array,
    n: int,
    user_values: jax.Array | None = None,
) -> jax.Array:
    """``[B or 1, H, rows, len(cols)]`` bool: where each head's target is 1, or nonzero for
    registered patterns (columns past ``n``, the padding of the last block, never are)."""
    kind = np.asarray(patterns.kind)[:, None, None]
    offset = np.asarray(patterns.offset)[:, None, None]
    row = jax.lax.broadcasted_iota(jnp.int32, (1, rows, 1), 1)
    col = cols[None, None, :]
    target = ((kind == DIAGONAL) & (col - row == offset)) | ((kind == FIRST) & (col == 0))
    target = target[None]
    if head_tokens is not None:  # [B, H, n_padded] → the tile's columns
        on_token = jnp.take(head_tokens, cols, axis=2)[:, :, None, :] > 0
        target = target | ((kind == TOKEN)[None] & on_token)
    if user_values is not None:  # the tile of registered patterns' targets (user_tile)
        target = target | (user_values != 0)
    return target & (col < n)[None]


def target_counts(patterns: HeadPatterns, head_tokens: jax.Array | None, n: int) -> jax.Array:
    """``[B or 1, H, n]``: how many targets each query row has (0 or 1 for positional
    patterns; the token count of the example for token sets; nonzeros for registered ones)."""
    kind = np.asarray(patterns.kind)[:, None]
    offset = np.asarray(patterns.offset)[:, None]
    row = np.arange(n)[None, :]
    inside = (row + offset >= 0) & (row + offset < n)
    fixed = (((kind == DIAGONAL) & inside) | (kind == FIRST)).astype(np.float32)
    for h in np.flatnonzero(kind[:, 0] == USER):
        target = pattern_target(patterns.user[patterns.user_index[h]], n)
        fixed[h] = np.count_nonzero(target, axis=1)
    counts = jnp.asarray(fixed)[None]
    if head_tokens is not None:
        per_example = jnp.sum(head_tokens[:, :, :n], axis=-1, keepdims=True)  # [B, H, 1]
        counts = counts + jnp.where(kind[None] == TOKEN, per_example, 0.0)
    return counts


def user_row_stats(patterns: HeadPatterns, n: int) -> tuple[jax.Array, jax.Array]:
    """``[1, H, n]`` each: the value of a row's only nonzero target (1 for other rows and
    heads) and the row's ``Σ P²`` minus the count (0 for 0/1 targets)."""
    single = np.ones((len(patterns.kind), n), np.float32)
    extra = np.zeros((len(patterns.kind), n), np.float32)
    for h in np.flatnonzero(np.asarray(patterns.kind) == USER):
        target = pattern_target(patterns.user[patterns.user_index[h]], n).astype(np.float64)
        count = np.count_nonzero(target, axis=1)
        single[h] = np.where(count == 1, target.sum(axis=1), 1.0)
        extra[h] = np.square(target).sum(axis=1) - count
    return jnp.asarray(single)[None], jnp.asarray(extra)[None]


def key_bias(
    q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array, padded: int
) -> jax.Array:
    """``[B, padded]`` additive bias hiding masked keys and the padding past ``n`` (checks the
    shapes of a kernel's inputs on the way)."""
    if key_mask.shape != q.shape[:2] or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"attention expects q, k, v of shape [B, n, H, d] and key_mask [B, n]; got q "
            f"{q.shape}, k {k.shape}, v {v.shape}, key_mask {key_mask.shape}"
        )
    visible = jnp.pad(key_mask.astype(bool), ((0, 0), (0, padded - key_mask.shape[1])))
    return jnp.where(visible, 0.0, NEG).astype(jnp.float32)


def head_token_masks(
    patterns: HeadPatterns | None, token_masks: jax.Array | None, padded: int
) -> jax.Array | None:
    """``[B, H, padded]``: where each token-set head's token is (keys past ``n`` padded with 0),
    or None when no head has a token set."""
    if patterns is None or TOKEN not in patterns.kind:
        return None
    if token_masks is None:
        raise ValueError("guided token-set heads need token_masks")
    per_head = jnp.take(token_masks.astype(jnp.float32), np.asarray(patterns.token_group), axis=0)
    per_head = jnp.swapaxes(per_head, 0, 1)  # [B, H, n]
    return jnp.pad(per_head, ((0, 0), (0, 0), (0, padded - per_head.shape[-1])))
