"""Attention guidance: head specs, pattern targets and the auxiliary loss.

The reference loss is, for every guided layer and every pattern group g of k_g heads,
``mean((A[:, heads_g] - P_g) ** 2)`` over all ``B * k_g * n * n`` entries, summed over groups
and layers. We never build the dense targets P. Every pattern is a 0/1 predicate on
(query, key) that is cheap to evaluate where it is needed (an iota comparison for the
positional patterns, a per-example key mask for token sets), so each entry contributes
``(A - 1)^2`` where the predicate holds and ``A^2`` elsewhere: one pass over the guided heads'
probabilities and no extra ``n x n`` memory.

We do not use the expansion ``sum A^2 - 2 sum A*P + sum P^2`` here: in float32 it cancels
catastrophically once heads follow their pattern closely (relative error above 1 for losses
near 1e-4), which is exactly where training drives them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

POSITIONAL_PATTERNS = ("self", "next", "prev", "first")
# A token may itself hold brackets (``token[[SEP]]:1``): it runs to the first "]" that is
# followed by the ":" of the count.
_NAMED_ITEM = re.compile(
    r"\s*(?P<name>self|next|prev|first|token\[(?P<token>.+?)\](?=\s*:))\s*:\s*"
    r"(?P<count>[^,]*?)\s*(?:,|$)"
)


class SpecError(ValueError):
    """A head spec that cannot be parsed or does not fit the model."""


class TokenLookup(Protocol):
    def token_to_id(self, token: str) -> int: ...


@dataclasses.dataclass(frozen=True)
class PatternGroup:
    """``num_heads`` consecutive heads guided towards one pattern."""

    pattern: str  # one of POSITIONAL_PATTERNS or "token"
    num_heads: int
    token: str | None = None

    @property
    def name(self) -> str:
        return f"token[{self.token}]" if self.pattern == "token" else self.pattern


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """Which heads follow which pattern; the same heads in every layer from ``start_layer`` on.

    Heads are assigned from head 0 upward in the order of ``groups``, as in the reference's
    ``--attn_head_types``; heads past ``num_guided_heads`` are unguided.
    """

    groups: tuple[PatternGroup, ...]
    start_layer: int = 0

    @classmethod
    def parse(cls, text: str, *, tokens: Sequence[str] = (), start_layer: int = 0) -> HeadSpec:
        """Parses ``"0,1,1,4"`` (reference: self,next,prev,first counts), the probing form
        ``"0,1,1,0,3,3"`` with ``tokens=("<s>", "</s>")`` for the counts after the fourth, or the
        named form ``"next:1,prev:1,first:4,token[</s>]:2"``."""
        stripped = text.strip()
        if not stripped:
            raise SpecError(
                "guidance head spec is empty; expected e.g. '0,1,1,4' or 'next:1,first:4'"
            )
        if ":" not in stripped:
            groups = _parse_reference_form(stripped, tuple(tokens))
        else:
            if tokens:
                raise SpecError(
                    f"guidance tokens {list(tokens)} are only used with the numeric "
                    f"spec form; name tokens inline instead, e.g. 'token[</s>]:2'"
                )
            groups = _parse_named_form(stripped)
        if isinstance(start_layer, bool) or not isinstance(start_layer, int) or start_layer < 0:
            raise SpecError(
                f"guidance start layer must be a non-negative integer, got {start_layer!r}"
            )
        spec = cls(groups=groups, start_layer=start_layer)
        if spec.num_guided_heads == 0:
            raise SpecError(
                f"guidance head spec {text!r} guides no head; expected at least one positive count"
            )
        return spec

    @property
    def num_guided_heads(self) -> int:
        return sum(g.num_heads for g in self.groups)

    @property
    def head_ranges(self) -> tuple[tuple[int, int], ...]:
        """``(first_head, stop_head)`` of each group."""
        ranges, start = [], 0
        for group in self.groups:
            ranges.append((start, start + group.num_heads))
            start += group.num_heads
        return tuple(ranges)

    @property
    def tokens(self) -> tuple[str, ...]:
        """Token strings of the token-set groups, in group order."""
        return tuple(g.token for g in self.groups if g.pattern == "token")

    def guides_layer(self, layer: int) -> bool:
        return layer >= self.start_layer

    def validate(self, *, num_heads: int, num_layers: int) -> None:
        """Raises SpecError when the spec does not fit a model of this shape."""
        if self.num_guided_heads > num_heads:
            raise SpecError(
                f"guidance head spec '{self}' needs {self.num_guided_heads} heads but "
                f"the model has {num_heads} per layer"
            )
        if self.start_layer >= num_layers:
            raise SpecError(
                f"guidance start layer {self.start_layer} is out of range for a model "
                f"with {num_layers} layers (expected 0..{num_layers - 1})"
            )

    def token_ids(self, tokenizer: TokenLookup) -> tuple[int, ...]:
        """Vocabulary ids of the token-set groups (errors name an unknown token)."""
        ids = tuple(tokenizer.token_to_id(t) for t in self.tokens)
        for token, token_id in zip(self.tokens, ids, strict=True):
            if not isinstance(token_id, int):
                raise SpecError(f"guidance token {token!r} is not in the tokenizer's vocabulary")
        return ids

    def __str__(self) -> str:
        return ",".join(f"{g.name}:{g.num_heads}" for g in self.groups)


def _parse_count(raw: str, what: str, text: str) -> int:
    if not re.fullmatch(r"\d+", raw.strip()):
        raise SpecError(
            f"head count {raw.strip()!r} for {what} in guidance head spec {text!r} "
            f"is not a non-negative integer"
        )
    return int(raw)


def _parse_reference_form(text: str, tokens: tuple[str, ...]) -> tuple[PatternGroup, ...]:
    parts = [p.strip() for p in text.split(",")]
    if any(not p for p in parts):
        raise SpecError(f"guidance head spec {text!r} has an empty entry")
    counts = [_parse_count(p, f"entry {i}", text) for i, p in enumerate(parts)]
    if len(counts) < len(POSITIONAL_PATTERNS):
        raise SpecError(
            f"guidance head spec {text!r} has {len(counts)} counts; the numeric form "
            f"needs at least 4 (self,next,prev,first)"
        )
    extra = counts[len(POSITIONAL_PATTERNS) :]
    if len(extra) != len(tokens):
        raise SpecError(
            f"guidance head spec {text!r} has {len(extra)} token-set counts after the "
            f"four positional ones but {len(tokens)} tokens were given "
            f"({list(tokens)}); set guidance.tokens to one token per extra count"
        )
    groups = [PatternGroup(p, c) for p, c in zip(POSITIONAL_PATTERNS, counts, strict=False)]
    groups += [PatternGroup("token", c, t) for t, c in zip(tokens, extra, strict=True)]
    return tuple(g for g in groups if g.num_heads > 0)


def _parse_named_form(text: str) -> tuple[PatternGroup, ...]:
    groups, seen, pos = [], set(), 0
    while pos < len(text):
        match = _NAMED_ITEM.match(text, pos)
        if match is None or match.end() == pos:
            item = text[pos:].split(",")[0].strip()
            raise SpecError(
                f"cannot parse {item!r} in guidance head spec {text!r}; expected "
                f"NAME:COUNT items with NAME one of self, next, prev, first, "
                f"token[TOKEN]"
            )
        name = match["name"]
        if name in seen:
            raise SpecError(f"pattern {name!r} is listed twice in guidance head spec {text!r}")
        seen.add(name)
        count = _parse_count(match["count"], name, text)
        if count > 0:
            token = match["token"]
            groups.append(PatternGroup("token" if token else name, count, token))
        pos = match.end()
    return tuple(groups)


# ----------------------------------------------------------------------------- loss


def token_masks(input_ids: jax.Array, token_ids: Sequence[int]) -> jax.Array:
    """``[T, B, n]`` float mask of where each token-set group's token occurs."""
    ids = jnp.asarray(token_ids, dtype=input_ids.dtype).reshape(-1, 1, 1)
    return (input_ids[None] == ids).astype(jnp.float32)


def target_predicate(group: PatternGroup, n: int, mask: jax.Array | None = None) -> jax.Array:
    """Where ``group``'s target is 1: ``[n, n]`` for positional patterns (``next`` has no 1 in
    its last row, ``prev`` none in its first), ``[B, 1, 1, n]`` for a token set given its
    ``[B, n]`` token mask."""
    rows = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
    if group.pattern == "self":
        return cols == rows
    if group.pattern == "next":
        return cols == rows + 1
    if group.pattern == "prev":
        return cols == rows - 1
    if group.pattern == "first":
        return cols == 0
    if mask is None:
        raise ValueError(f"guidance group {group.name} needs token masks (input ids)")
    return (mask > 0)[:, None, None, :]


def group_losses(probs: jax.Array, spec: HeadSpec, masks: jax.Array | None = None) -> jax.Array:
    """Mean squared error of each group against its pattern, shape ``[num_groups]``.

    ``probs`` is ``[B, H, n, n]`` with the guided heads first, in spec order; heads past
    ``spec.num_guided_heads`` are weighted out rather than sliced off, so an array sharded over
    heads is reduced where each head lives. ``masks`` is ``token_masks(...)`` when the spec has
    token-set groups.
    """
    probs = probs.astype(jnp.float32)
    batch, heads, n, n_keys = probs.shape
    if n != n_keys:
        raise ValueError(f"attention must be square over (query, key), got shape {probs.shape}")
    if heads < spec.num_guided_heads:
        raise ValueError(
            f"guidance spec '{spec}' needs {spec.num_guided_heads} heads, the maps have {heads}"
        )
    rows = batch if spec.tokens else 1
    per_head = [jnp.zeros((rows, n, n), bool)] * heads  # unguided: weight 0 below
    token_index = 0
    for group, (lo, hi) in zip(spec.groups, spec.head_ranges, strict=True):
        mask = None
        if group.pattern == "token":
            mask = None if masks is None else masks[token_index]
            token_index += 1
        target = target_predicate(group, n, mask)
        target = jnp.broadcast_to(target.reshape(-1, target.shape[-2], n), (rows, n, n))
        per_head[lo:hi] = [target] * (hi - lo)
    on_target = jnp.stack(per_head, axis=1)  # [rows, H, n, n], fused away by XLA
    squared = jnp.where(on_target, jnp.square(probs - 1.0), jnp.square(probs))
    # Rows first, then the rest: keeps float32 rounding of the long sums near 1e-7.
    head_sums = jnp.sum(jnp.sum(squared, axis=-1), axis=(0, 2))
    return losses_from_head_sums(head_sums, spec, batch, n)


def losses_from_head_sums(head_sums: jax.Array, spec: HeadSpec, batch: int, n: int) -> jax.Array:
    """Per-group means ``[G]`` from each head's ``Σ (A - P)²`` over batch, queries and keys
    (``[H]``; unguided heads get weight 0, so no head is sliced off a head-sharded array)."""
    weights = np.zeros((len(spec.groups), head_sums.shape[0]), np.float32)
    for index, (lo, hi) in enumerate(spec.head_ranges):
        weights[index, lo:hi] = 1.0 / (batch * (hi - lo) * n * n)
    return jnp.dot(weights, head_sums, precision=jax.lax.Precision.HIGHEST)


def guidance_loss(
    attentions: Sequence[jax.Array],
    spec: HeadSpec,
    input_ids: jax.Array | None = None,
    token_ids: Mapping[str, int] | Sequence[int] | None = None,
) -> jax.Array:
    """The reference's ``compute_ag_loss`` on full post-softmax maps, one ``[B, H, n, n]`` per
    layer: the sum over guided layers and groups of each group's mean squared error.

    ``token_ids`` maps each token-set token string to its id (or lists the ids in group order);
    ``input_ids`` ``[B, n]`` says where those tokens are. Only needed for token-set groups.
    """
    if not attentions:
        raise ValueError("guidance_loss needs the attention maps of at least one layer")
    spec.validate(num_heads=attentions[0].shape[1], num_layers=len(attentions))
    masks = None
    if spec.tokens:
        if input_ids is None or token_ids is None:
            raise ValueError(
                f"guidance spec '{spec}' has token-set groups; pass input_ids and token_ids"
            )
        if isinstance(token_ids, Mapping):
            missing = [t for t in spec.tokens if t not in token_ids]
            if missing:
                raise ValueError(f"token_ids lacks ids for tokens {missing}")
            token_ids = [token_ids[t] for t in spec.tokens]
        if len(token_ids) != len(spec.tokens):
            raise ValueError(f"got {len(token_ids)} token ids for {len(spec.tokens)} token groups")
        masks = token_masks(jnp.asarray(input_ids), token_ids)
    guide = Guide(spec, masks)  # the same per-layer scoring the model runs inside its layers
    total = jnp.zeros((), jnp.float32)
    for layer, attention in enumerate(attentions):
        if spec.guides_layer(layer):
            total += jnp.sum(guide.layer_losses(attention))
    return total


def guidance_weight(
    step: jax.Array | int, *, scale: float, stagnant_steps: int, total_steps: int
) -> jax.Array:
    """``scale * w(step)``: constant until ``stagnant_steps``, then linear decay to 0 at
    ``total_steps``, as in the reference trainer."""
    step = jnp.asarray(step, jnp.float32)
    decay = jnp.maximum(0.0, (total_steps - step) / max(1, total_steps - stagnant_steps))
    return scale * jnp.where(step < stagnant_steps, 1.0, decay)


@dataclasses.dataclass(frozen=True)
class Guide:
    """What an attention layer needs to score its guided heads inside the forward pass.

    ``after_dropout=True`` reproduces the reference, whose loss saw the attention probabilities
    after dropout (``A * mask / (1 - p)``); False guides the clean softmax output.
    """

    spec: HeadSpec
    masks: jax.Array | None = None
    after_dropout: bool = True

    def layer_losses(self, probs: jax.Array) -> jax.Array:
        """Per-group losses ``[G]`` from one layer's ``[B, H, n, n]`` (or guided-only) maps."""
        return group_losses(probs, self.spec, self.masks)
