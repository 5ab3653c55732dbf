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

Beyond the built-in sparse patterns, a pattern may be any registered function ``f(n) -> [n, n]``
(:func:`register_pattern`): its target is built with numpy once per sequence length and cached
(:func:`pattern_target`), so under jit it is a compile-time constant and each entry contributes
``(A - P)^2`` against it. Specs may also place different heads in different layers
(``layers=0-3:next:1,prev:1;4-11:first:2``, :class:`LayeredSpec`).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, Union

import jax
import jax.numpy as jnp
import numpy as np

POSITIONAL_PATTERNS = ("self", "next", "prev", "first")
# A token may itself hold brackets (``token[[SEP]]:1``): it runs to the first "]" that is
# followed by the ":" of the count. Other names are built-in or registered patterns.
_NAMED_ITEM = re.compile(
    r"\s*(?P<name>token\[(?P<token>.+?)\](?=\s*:)|[A-Za-z_][A-Za-z0-9_]*)\s*:\s*"
    r"(?P<count>[^,]*?)\s*(?:,|$)"
)
_PATTERN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RESERVED_NAMES = (*POSITIONAL_PATTERNS, "token", "layers")


class SpecError(ValueError):
    """A head spec that cannot be parsed or does not fit the model."""


class TokenLookup(Protocol):
    def token_to_id(self, token: str) -> int: ...


# ----------------------------------------------------------------------------- user patterns

PatternBuilder = Callable[[int], np.ndarray]


@dataclasses.dataclass(frozen=True)
class UserPattern:
    """A registered pattern: ``builder(n)`` gives the ``[n, n]`` target (rows: queries, columns:
    keys); ``normalize`` divides each row by its sum (rows summing to 0 stay 0)."""

    name: str
    builder: PatternBuilder
    normalize: bool = False


_REGISTRY: dict[str, UserPattern] = {}
_TARGETS: dict[tuple[str, int], np.ndarray] = {}
_LOCK = threading.Lock()


def register_pattern(
    name: str, builder: PatternBuilder, *, normalize: bool = False, replace: bool = False
) -> UserPattern:
    """Makes ``name`` usable in head specs (``"next:1,NAME:2"``).

    Call it where the spec is parsed, e.g. at the top of a config file (every process of a run
    loads its config). ``replace=True`` rebinds a name and drops its cached targets."""
    if not isinstance(name, str) or not _PATTERN_NAME.fullmatch(name):
        raise SpecError(
            f"pattern name {name!r} must be an identifier (letters, digits, '_'; not starting "
            f"with a digit) so head specs can name it"
        )
    if name in _RESERVED_NAMES:
        raise SpecError(f"pattern name {name!r} is reserved for a built-in pattern or keyword")
    if not callable(builder):
        raise SpecError(f"pattern {name!r}: the builder must be a function n -> [n, n] array")
    with _LOCK:
        if name in _REGISTRY and not replace:
            raise SpecError(
                f"pattern {name!r} is already registered; pass replace=True to rebind it"
            )
        pattern = UserPattern(name, builder, bool(normalize))
        _REGISTRY[name] = pattern
        for key in [k for k in _TARGETS if k[0] == name]:
            del _TARGETS[key]
    return pattern


def registered_patterns() -> tuple[str, ...]:
    """Names of the registered (non-built-in) patterns, sorted."""
    return tuple(sorted(_REGISTRY))


def pattern_target(name: str, n: int) -> np.ndarray:
    """The ``[n, n]`` float32 target of registered pattern ``name``, built on first use for each
    length and cached (read-only): under jit it is a constant, never rebuilt per step."""
    key = (name, int(n))
    with _LOCK:
        cached = _TARGETS.get(key)
        pattern = _REGISTRY.get(name)
    if cached is not None:
        return cached
    if pattern is None:
        raise SpecError(
            f"unknown pattern {name!r}; registered patterns are {list(registered_patterns())}"
        )
    target = _checked_target(pattern, int(n))
    with _LOCK:
        return _TARGETS.setdefault(key, target)


def _checked_target(pattern: UserPattern, n: int) -> np.ndarray:
    raw = pattern.builder(n)
    try:
        target = np.array(raw, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise SpecError(f"pattern {pattern.name!r}: builder({n}) is not numeric: {error}") from None
    if target.shape != (n, n):
        raise SpecError(
            f"pattern {pattern.name!r}: builder({n}) returned shape {target.shape}, "
            f"expected ({n}, {n})"
        )
    if not np.all(np.isfinite(target)):
        raise SpecError(f"pattern {pattern.name!r}: builder({n}) returned non-finite values")
    if pattern.normalize:
        if np.any(target < 0):
            raise SpecError(
                f"pattern {pattern.name!r} is row-normalised but builder({n}) returned "
                f"negative values"
            )
        sums = target.sum(axis=1, keepdims=True)
        target = np.where(sums > 0, target / np.where(sums > 0, sums, 1.0), 0.0)
        target = target.astype(np.float32)
    target.setflags(write=False)
    return target


def window_pattern(k: int) -> PatternBuilder:
    """``|i - j| <= k``: a band of ``2k + 1`` keys around each query."""

    def build(n: int) -> np.ndarray:
        index = np.arange(n)
        return (np.abs(index[:, None] - index[None, :]) <= k).astype(np.float32)

    return build


def offset_pattern(offset: int) -> PatternBuilder:
    """``j = i + offset`` (``-k``: the k-th previous token); rows without such a key are 0."""

    def build(n: int) -> np.ndarray:
        return np.eye(n, k=offset, dtype=np.float32)

    return build


def last_pattern(n: int) -> np.ndarray:
    """Every query attends to the last position (the ``</s>`` of a packed block)."""
    target = np.zeros((n, n), np.float32)
    target[:, -1] = 1.0
    return target


for _k in (1, 2, 3):
    register_pattern(f"window{_k}", window_pattern(_k), normalize=True)
    register_pattern(f"prev{_k + 1}", offset_pattern(-(_k + 1)))
    register_pattern(f"next{_k + 1}", offset_pattern(_k + 1))
register_pattern("last", last_pattern)


# ----------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class PatternGroup:
    """``num_heads`` consecutive heads guided towards one pattern."""

    pattern: str  # one of POSITIONAL_PATTERNS, "token" or a registered pattern's name
    num_heads: int
    token: str | None = None

    @property
    def name(self) -> str:
        return f"token[{self.token}]" if self.pattern == "token" else self.pattern

    @property
    def is_user(self) -> bool:
        """Whether the target is a registered dense pattern (not a built-in sparse one)."""
        return self.pattern not in POSITIONAL_PATTERNS and self.pattern != "token"


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """Which heads follow which pattern; the same heads in every layer from ``start_layer`` on.

    Heads are assigned from head 0 upward in the order of ``groups``, as in the reference's
    ``--attn_head_types``; heads past ``num_guided_heads`` are unguided.
    """

    groups: tuple[PatternGroup, ...]
    start_layer: int = 0
    # Where each group's loss goes in the per-layer loss vector (default: group i at i, of
    # len(groups)): a layer of a LayeredSpec writes into the run's metric groups.
    outputs: tuple[int, ...] = ()
    num_outputs: int = 0

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
        if stripped.startswith("layers="):
            raise SpecError(
                f"guidance head spec {text!r} places heads per layer; parse it with "
                f"parse_spec (LayeredSpec)"
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

    def for_layer(self, layer: int) -> HeadSpec | None:
        """The spec of layer ``layer`` (this one from ``start_layer`` on), or None."""
        return self if self.guides_layer(layer) else None

    def output_slots(self) -> tuple[tuple[int, ...], int]:
        """``(slot of each group, length of the loss vector)``."""
        if self.outputs:
            return self.outputs, self.num_outputs
        return tuple(range(len(self.groups))), len(self.groups)

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

    @property
    def user_patterns(self) -> tuple[str, ...]:
        """Names of the registered patterns this spec uses."""
        return tuple(g.pattern for g in self.groups if g.is_user)


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
        if not match["token"] and name not in POSITIONAL_PATTERNS and name not in _REGISTRY:
            item = text[pos : match.end()].strip().rstrip(",").strip()
            raise SpecError(
                f"unknown pattern {name!r} in {item!r} of guidance head spec {text!r}; "
                f"expected NAME:COUNT items with NAME one of self, next, prev, first, "
                f"token[TOKEN] or a registered pattern ({', '.join(registered_patterns())}; "
                f"add one with guided_jax.guidance.register_pattern)"
            )
        if name in seen:
            raise SpecError(f"pattern {name!r} is listed twice in guidance head spec {text!r}")
        seen.add(name)
        count = _parse_count(match["count"], name, text)
        if count > 0:
            token = match["token"]
            groups.append(PatternGroup("token" if token else name, count, token))
        pos = match.end()
    return tuple(groups)


_LAYER_RANGE = re.compile(r"\s*(?P<first>\d+)\s*(?:-\s*(?P<last>\d+)\s*)?:(?P<spec>.*)", re.S)


@dataclasses.dataclass(frozen=True)
class LayeredSpec:
    """Different heads in different layers: ``layers=0-3:next:1,prev:1;4-11:first:2,window2:2``.

    Each part names a layer or an inclusive range of layers and a head spec in either form
    (heads from 0 upward, as in :class:`HeadSpec`); layers no part names are unguided. The run's
    loss groups (``groups``, logged as ``ag_loss/<name>``) are the distinct pattern names in
    order of first appearance; a group's loss sums over the layers that use it, as a uniform
    spec's sums over its layers.
    """

    parts: tuple[tuple[int, int, HeadSpec], ...]  # (first layer, last layer, spec), ascending

    @classmethod
    def parse(cls, text: str, *, tokens: Sequence[str] = ()) -> LayeredSpec:
        body = text.strip()
        if not body.startswith("layers="):
            raise SpecError(f"per-layer guidance spec {text!r} must start with 'layers='")
        chunks = [c for c in body[len("layers=") :].split(";")]
        if not any(c.strip() for c in chunks):
            raise SpecError(f"per-layer guidance spec {text!r} names no layers")
        parsed: list[tuple[int, int, HeadSpec]] = []
        for chunk in chunks:
            if not chunk.strip():
                raise SpecError(f"per-layer guidance spec {text!r} has an empty part")
            match = _LAYER_RANGE.fullmatch(chunk)
            if match is None:
                raise SpecError(
                    f"cannot parse {chunk.strip()!r} in per-layer guidance spec {text!r}; "
                    f"expected FIRST-LAST:SPEC or LAYER:SPEC, e.g. '0-3:next:1,prev:1'"
                )
            first = int(match["first"])
            last = int(match["last"]) if match["last"] is not None else first
            if last < first:
                raise SpecError(
                    f"layer range {first}-{last} in per-layer guidance spec {text!r} is "
                    f"reversed; expected FIRST-LAST with FIRST <= LAST"
                )
            try:
                part_tokens = tokens if ":" not in match["spec"] else ()
                spec = HeadSpec.parse(match["spec"], tokens=part_tokens)
            except SpecError as error:
                raise SpecError(f"layers {first}-{last} of {text!r}: {error}") from None
            parsed.append((first, last, spec))
        parsed.sort(key=lambda part: part[0])
        for (a_first, a_last, a), (b_first, b_last, b) in itertools.pairwise(parsed):
            if b_first <= a_last:
                raise SpecError(
                    f"layers {b_first}-{min(a_last, b_last)} are given by both "
                    f"'{a_first}-{a_last}:{a}' and '{b_first}-{b_last}:{b}' in per-layer "
                    f"guidance spec {text!r}; their heads would overlap (give each layer once)"
                )
        return cls._with_outputs(tuple(parsed))

    @classmethod
    def _with_outputs(cls, parts: tuple[tuple[int, int, HeadSpec], ...]) -> LayeredSpec:
        """Tells each part's spec where its groups' losses go among the run's groups."""
        names: list[str] = []
        for _, _, spec in parts:
            names += [g.name for g in spec.groups if g.name not in names]
        placed = tuple(
            (
                first,
                last,
                dataclasses.replace(
                    spec,
                    outputs=tuple(names.index(g.name) for g in spec.groups),
                    num_outputs=len(names),
                ),
            )
            for first, last, spec in parts
        )
        return cls(placed)

    @property
    def groups(self) -> tuple[PatternGroup, ...]:
        """The run's loss groups (one per distinct pattern name; ``num_heads`` is the most
        heads any layer gives it)."""
        found: dict[str, PatternGroup] = {}
        for _, _, spec in self.parts:
            for group in spec.groups:
                known = found.get(group.name)
                if known is None or known.num_heads < group.num_heads:
                    found[group.name] = group
        order = {name: i for i, name in enumerate(self._names())}
        return tuple(sorted(found.values(), key=lambda g: order[g.name]))

    def _names(self) -> list[str]:
        names: list[str] = []
        for _, _, spec in self.parts:
            names += [g.name for g in spec.groups if g.name not in names]
        return names

    @property
    def tokens(self) -> tuple[str, ...]:
        """Token strings of every token-set group of any layer, each once, in first use order."""
        tokens: list[str] = []
        for _, _, spec in self.parts:
            tokens += [t for t in spec.tokens if t not in tokens]
        return tuple(tokens)

    @property
    def num_guided_heads(self) -> int:
        """The most heads any layer guides."""
        return max(spec.num_guided_heads for _, _, spec in self.parts)

    @property
    def user_patterns(self) -> tuple[str, ...]:
        names: list[str] = []
        for _, _, spec in self.parts:
            names += [p for p in spec.user_patterns if p not in names]
        return tuple(names)

    def for_layer(self, layer: int) -> HeadSpec | None:
        for first, last, spec in self.parts:
            if first <= layer <= last:
                return spec
        return None

    def guides_layer(self, layer: int) -> bool:
        return self.for_layer(layer) is not None

    def validate(self, *, num_heads: int, num_layers: int) -> None:
        """Raises SpecError when a part does not fit a model of this shape."""
        for first, last, spec in self.parts:
            if last >= num_layers:
                raise SpecError(
                    f"layer range {first}-{last} of per-layer guidance spec '{self}' is out of "
                    f"range for a model with {num_layers} layers (expected 0..{num_layers - 1})"
                )
            if spec.num_guided_heads > num_heads:
                raise SpecError(
                    f"layers {first}-{last} of guidance head spec '{self}' need "
                    f"{spec.num_guided_heads} heads but the model has {num_heads} per layer"
                )

    def token_ids(self, tokenizer: TokenLookup) -> tuple[int, ...]:
        """Vocabulary ids of :attr:`tokens` (errors name an unknown token)."""
        return HeadSpec(tuple(PatternGroup("token", 1, t) for t in self.tokens)).token_ids(
            tokenizer
        )

    def __str__(self) -> str:
        parts = [
            f"{first}-{last}:{spec}" if last > first else f"{first}:{spec}"
            for first, last, spec in self.parts
        ]
        return "layers=" + ";".join(parts)


Spec = Union[HeadSpec, LayeredSpec]  # noqa: UP007 (a runtime alias)


def parse_spec(text: str, *, tokens: Sequence[str] = (), start_layer: int = 0) -> Spec:
    """A uniform :class:`HeadSpec` (``"0,1,1,4"``, ``"next:1,window2:2"``) or, for text starting
    with ``layers=``, a :class:`LayeredSpec` (which takes no ``start_layer``)."""
    if text.strip().startswith("layers="):
        if start_layer:
            raise SpecError(
                f"guidance.start_layer={start_layer} cannot be combined with the per-layer spec "
                f"{text!r}; name the layers in the spec instead"
            )
        return LayeredSpec.parse(text, tokens=tokens)
    return HeadSpec.parse(text, tokens=tokens, start_layer=start_layer)


# ----------------------------------------------------------------------------- loss


def token_masks(input_ids: jax.Array, token_ids: Sequence[int]) -> jax.Array:
    """``[T, B, n]`` float mask of where each token-set group's token occurs."""
    ids = jnp.asarray(token_ids, dtype=input_ids.dtype).reshape(-1, 1, 1)
    return (input_ids[None] == ids).astype(jnp.float32)


def target_predicate(group: PatternGroup, n: int, mask: jax.Array | None = None) -> jax.Array:
    """Where ``group``'s target is 1: ``[n, n]`` for positional patterns (``next`` has no 1 in
    its last row, ``prev`` none in its first) and registered ones (where the target is not 0),
    ``[B, 1, 1, n]`` for a token set given its ``[B, n]`` token mask."""
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
    if group.is_user:
        return jnp.asarray(pattern_target(group.pattern, n) != 0)
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
    # Registered patterns' targets (constants); 0 for every other head.
    values = np.zeros((heads, n, n), np.float32) if spec.user_patterns else None
    token_index = 0
    for group, (lo, hi) in zip(spec.groups, spec.head_ranges, strict=True):
        mask = None
        if group.pattern == "token":
            mask = None if masks is None else masks[token_index]
            token_index += 1
        if group.is_user:
            assert values is not None
            values[lo:hi] = pattern_target(group.pattern, n)
            continue
        target = target_predicate(group, n, mask)
        target = jnp.broadcast_to(target.reshape(-1, target.shape[-2], n), (rows, n, n))
        per_head[lo:hi] = [target] * (hi - lo)
    on_target = jnp.stack(per_head, axis=1)  # [rows, H, n, n], fused away by XLA
    off = jnp.square(probs) if values is None else jnp.square(probs - values)
    squared = jnp.where(on_target, jnp.square(probs - 1.0), off)
    # Rows first, then the rest: keeps float32 rounding of the long sums near 1e-7.
    head_sums = jnp.sum(jnp.sum(squared, axis=-1), axis=(0, 2))
    return losses_from_head_sums(head_sums, spec, batch, n)


def losses_from_head_sums(head_sums: jax.Array, spec: HeadSpec, batch: int, n: int) -> jax.Array:
    """Per-group means ``[G]`` from each head's ``Σ (A - P)²`` over batch, queries and keys
    (``[H]``; unguided heads get weight 0, so no head is sliced off a head-sharded array)."""
    slots, size = spec.output_slots()
    weights = np.zeros((size, head_sums.shape[0]), np.float32)
    for slot, (lo, hi) in zip(slots, spec.head_ranges, strict=True):
        weights[slot, lo:hi] = 1.0 / (batch * (hi - lo) * n * n)
    return jnp.dot(weights, head_sums, precision=jax.lax.Precision.HIGHEST)


def guidance_loss(
    attentions: Sequence[jax.Array],
    spec: Spec,
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
        layer_guide = guide.for_layer(layer)
        if layer_guide is not None:
            total += jnp.sum(layer_guide.layer_losses(attention))
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

    spec: Spec  # a layer's HeadSpec inside the model; the run's spec before for_layer
    masks: jax.Array | None = None  # [T, B, n] for the spec's tokens, in spec.tokens order
    after_dropout: bool = True

    def for_layer(self, layer: int) -> Guide | None:
        """The guide of one layer (its spec, and the token masks it uses), or None when the
        layer is unguided. Its losses are laid out as the run's groups (``spec.groups``)."""
        spec = self.spec.for_layer(layer)
        if spec is None:
            return None
        if spec is self.spec:
            return self
        masks = self.masks
        if masks is not None:
            if spec.tokens:
                masks = masks[np.asarray([self.spec.tokens.index(t) for t in spec.tokens])]
            else:
                masks = None
        return Guide(spec, masks, self.after_dropout)

    def layer_losses(self, probs: jax.Array) -> jax.Array:
        """Per-group losses ``[G]`` from one layer's ``[B, H, n, n]`` (or guided-only) maps."""
        if not isinstance(self.spec, HeadSpec):
            raise TypeError("layer_losses needs a layer's guide; call for_layer(index) first")
        return group_losses(probs, self.spec, self.masks)
