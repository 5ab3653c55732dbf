"""Attention guidance: patterns, head specs, the loss without dense targets, head statistics.

The bottom layer of the package: nothing here imports from the rest of guided_jax, so any layer
can speak of specs and losses. A config file may register its own patterns::

    from guided_jax.guidance import register_pattern
"""

from guided_jax.guidance.loss import (
    Guide,
    group_losses,
    guidance_loss,
    guidance_weight,
    head_square_sums,
    losses_from_head_sums,
    target_predicate,
    token_masks,
)
from guided_jax.guidance.patterns import (
    POSITIONAL_PATTERNS,
    SpecError,
    last_pattern,
    offset_pattern,
    pattern_source,
    pattern_target,
    register_pattern,
    registered_patterns,
    window_pattern,
)
from guided_jax.guidance.spec import HeadSpec, LayeredSpec, PatternGroup, Spec, parse_spec

__all__ = [
    "POSITIONAL_PATTERNS",
    "Guide",
    "HeadSpec",
    "LayeredSpec",
    "PatternGroup",
    "Spec",
    "SpecError",
    "group_losses",
    "guidance_loss",
    "guidance_weight",
    "head_square_sums",
    "last_pattern",
    "losses_from_head_sums",
    "offset_pattern",
    "parse_spec",
    "pattern_source",
    "pattern_target",
    "register_pattern",
    "registered_patterns",
    "target_predicate",
    "token_masks",
    "window_pattern",
]
