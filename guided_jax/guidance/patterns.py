"""Guidance patterns: the built-in sparse ones by name, and registered dense targets.

Beyond the built-in patterns (``self``, ``next``, ``prev``, ``first`` and token sets, which are
0/1 predicates evaluated where they are needed), a pattern may be any registered function
``f(n) -> [n, n]`` (:func:`register_pattern`): its target is built with numpy once per sequence
length and cached (:func:`pattern_target`), so under jit it is a compile-time constant.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import threading
from collections.abc import Callable

import numpy as np

POSITIONAL_PATTERNS = ("self", "next", "prev", "first")
_PATTERN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RESERVED_NAMES = (*POSITIONAL_PATTERNS, "token", "layers")


class SpecError(ValueError):
    """A head spec or pattern that cannot be parsed or does not fit the model."""


PatternBuilder = Callable[[int], np.ndarray]


@dataclasses.dataclass(frozen=True)
class UserPattern:
    """A registered pattern: ``builder(n)`` gives the ``[n, n]`` target (rows: queries, columns:
    keys); ``normalize`` divides each row by its sum (rows summing to 0 stay 0)."""

    name: str
    builder: PatternBuilder
    normalize: bool = False
    registered_in: str = ""  # the file whose code registered it (a config file, usually)


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
        caller = sys._getframe(1).f_code.co_filename
        pattern = UserPattern(name, builder, bool(normalize), caller)
        _REGISTRY[name] = pattern
        for key in [k for k in _TARGETS if k[0] == name]:
            del _TARGETS[key]
    return pattern


def registered_patterns() -> tuple[str, ...]:
    """Names of the registered (non-built-in) patterns, sorted."""
    return tuple(sorted(_REGISTRY))


def pattern_source(name: str) -> str:
    """The file that registered pattern ``name`` ("" for a built-in pattern's name or one
    registered by this package), which a run keeps so that reading it back registers it."""
    with _LOCK:
        pattern = _REGISTRY.get(name)
    if pattern is None or pattern.registered_in == __file__:
        return ""
    return pattern.registered_in


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
