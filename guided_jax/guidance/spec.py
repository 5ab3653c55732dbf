"""Head specs: which heads of which layers follow which pattern.

The reference form ``0,1,1,4`` counts heads per positional pattern (self, next, prev, first) from
head 0 upward, as the reference's ``--attn_head_types``; the probing form ``0,1,1,0,3,3`` adds
token-set counts for ``tokens``; the named form ``next:1,prev:1,token[</s>]:2,window2:2`` also
names registered patterns; ``layers=0-3:...;4-11:...`` places different heads in different
layers (:class:`LayeredSpec`).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Sequence
from typing import Protocol, Union

from guided_jax.guidance.patterns import POSITIONAL_PATTERNS, SpecError, registered_patterns

# A token may itself hold brackets (``token[[SEP]]:1``): it runs to the first "]" that is
# followed by the ":" of the count. Other names are built-in or registered patterns.
_NAMED_ITEM = re.compile(
    r"\s*(?P<name>token\[(?P<token>.+?)\](?=\s*:)|[A-Za-z_][A-Za-z0-9_]*)\s*:\s*"
    r"(?P<count>[^,]*?)\s*(?:,|$)"
)


class TokenLookup(Protocol):
    def token_to_id(self, token: str) -> int: ...


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


# guidance.start_layer_groups: what the start layer holds back in the layers below it.
START_LAYER_GROUPS = ("all", "tokens")


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """Which heads follow which pattern; the same heads in every layer from ``start_layer`` on.

    Heads are assigned from head 0 upward in the order of ``groups``, as in the reference's
    ``--attn_head_types``; heads past ``num_guided_heads`` are unguided.
    """

    groups: tuple[PatternGroup, ...]
    start_layer: int = 0
    # Which groups start_layer holds back: "all" of them, or only the "tokens" groups (the
    # reference's probing code: positional heads are guided in every layer).
    start_layer_groups: str = "all"
    # Where each group's loss goes in the per-layer loss vector (default: group i at i, of
    # len(groups)): a layer of a LayeredSpec writes into the run's metric groups.
    outputs: tuple[int, ...] = ()
    num_outputs: int = 0

    @classmethod
    def parse(
        cls,
        text: str,
        *,
        tokens: Sequence[str] = (),
        start_layer: int = 0,
        start_layer_groups: str = "all",
    ) -> HeadSpec:
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
        if start_layer_groups not in START_LAYER_GROUPS:
            raise SpecError(
                f"guidance start layer groups must be one of {list(START_LAYER_GROUPS)}, got "
                f"{start_layer_groups!r}"
            )
        spec = cls(groups=groups, start_layer=start_layer, start_layer_groups=start_layer_groups)
        if spec.num_guided_heads == 0:
            raise SpecError(
                f"guidance head spec {text!r} guides no head; expected at least one positive count"
            )
        kinds = [g.pattern == "token" for g in groups]
        if start_layer_groups == "tokens" and kinds != sorted(kinds):
            raise SpecError(
                f"guidance head spec {text!r} puts token groups before other groups; with the "
                f"start layer holding back only token groups they must come last (the other "
                f"groups keep their heads in every layer)"
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
        return self.for_layer(layer) is not None

    def for_layer(self, layer: int) -> HeadSpec | None:
        """The spec of layer ``layer``: this one from ``start_layer`` on; below it None, or with
        ``start_layer_groups="tokens"`` the groups other than token sets (same heads, same loss
        slots), if any."""
        if layer >= self.start_layer:
            return self
        if self.start_layer_groups == "all":
            return None
        kept = tuple(i for i, g in enumerate(self.groups) if g.pattern != "token")
        if not kept:
            return None
        slots, count = self.output_slots()
        return dataclasses.replace(
            self,
            groups=tuple(self.groups[i] for i in kept),
            start_layer=0,
            outputs=tuple(slots[i] for i in kept),
            num_outputs=count,
        )

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
        if (
            not match["token"]
            and name not in POSITIONAL_PATTERNS
            and name not in registered_patterns()
        ):
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


def parse_spec(
    text: str,
    *,
    tokens: Sequence[str] = (),
    start_layer: int = 0,
    start_layer_groups: str = "all",
) -> Spec:
    """A uniform :class:`HeadSpec` (``"0,1,1,4"``, ``"next:1,window2:2"``) or, for text starting
    with ``layers=``, a :class:`LayeredSpec` (which takes no ``start_layer``)."""
    if text.strip().startswith("layers="):
        if start_layer:
            raise SpecError(
                f"guidance.start_layer={start_layer} cannot be combined with the per-layer spec "
                f"{text!r}; name the layers in the spec instead"
            )
        return LayeredSpec.parse(text, tokens=tokens)
    return HeadSpec.parse(
        text, tokens=tokens, start_layer=start_layer, start_layer_groups=start_layer_groups
    )
