"""Coreference probe (the AG paper's §5.3): does any head resolve reflexive anaphora?

For each sentence of the synthetic set (:mod:`guided_jax.analysis.anaphora`) and each layer
and head, we take the attention row of the reflexive's first subword token and count the
sentence as resolved when its highest attention lands on a token of the antecedent noun. The
table gives that fraction per head, with its max and mean over the heads of each layer;
a comparison puts two checkpoints side by side (e.g. AG against the baseline, to see whether
guidance changes the heads' linguistic behaviour). Words are mapped to tokens through the
tokenizer's character offsets, so subword splits ("her" + "self") are handled. The reference's
own protocol (its sentence file, with determiner or noun counted as the antecedent) is read by
:mod:`guided_jax.analysis.reflexive` and scored here the same way.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from guided_jax import weights
from guided_jax.analysis import anaphora, reflexive
from guided_jax.data.tokenizer import Tokenizer
from guided_jax.model import EncoderForMLM
from guided_jax.storage import as_path


class Probed(Protocol):
    """What the probe reads of a sentence (:class:`Encoded`, :class:`reflexive.Example`)."""

    @property
    def ids(self) -> tuple[int, ...]: ...

    @property
    def reflexive(self) -> int: ...

    @property
    def antecedents(self) -> tuple[int, ...]: ...


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One sentence as model input: ``<s> tokens </s>`` and the positions the probe reads."""

    ids: tuple[int, ...]
    reflexive: int  # position of the reflexive's first token
    antecedents: tuple[int, ...]  # positions of every token of the antecedent words


def _tokens_of(spans: list[tuple[int, int]], word: tuple[int, int]) -> list[int]:
    """Indices of the tokens whose character span overlaps ``word``'s."""
    start, end = word
    return [i for i, (s, e) in enumerate(spans) if max(s, start) < min(e, end)]


def encode(tokenizer: Tokenizer, example: anaphora.AnaphoraExample) -> Encoded:
    """Token ids with ``<s>``/``</s>`` (or ``[CLS]``/``[SEP]``) and the probe's positions."""
    ids, offsets = tokenizer.encode_offsets(example.text)
    reflexive = _tokens_of(offsets, example.spans[example.reflexive])
    antecedents = sorted(
        {t for w in example.antecedents for t in _tokens_of(offsets, example.spans[w])}
    )
    if not reflexive or not antecedents:
        raise ValueError(f"the tokenizer maps no token onto a probed word of {example.text!r}")
    return Encoded(
        (tokenizer.bos_id, *ids, tokenizer.eos_id),
        reflexive[0] + 1,
        tuple(a + 1 for a in antecedents),
    )


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """``accuracy[l, h]``: fraction of sentences whose reflexive's top attention in layer l,
    head h is on the antecedent."""

    accuracy: np.ndarray  # [layers, heads]
    sentences: int
    name: str = ""

    @property
    def layer_max(self) -> np.ndarray:
        return self.accuracy.max(axis=1)

    @property
    def layer_mean(self) -> np.ndarray:
        return self.accuracy.mean(axis=1)

    @property
    def best_head(self) -> tuple[int, int]:
        layer, head = np.unravel_index(int(np.argmax(self.accuracy)), self.accuracy.shape)
        return int(layer), int(head)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "sentences": self.sentences,
            "accuracy": self.accuracy.round(6).tolist(),
            "layer_max": self.layer_max.round(6).tolist(),
            "layer_mean": self.layer_mean.round(6).tolist(),
            "best_head": list(self.best_head),
        }


def top_keys(attentions: jax.Array | np.ndarray, rows: jax.Array | np.ndarray) -> jax.Array:
    """``[L, B, H]``: the key each head attends to most from row ``rows[b]`` of sentence b;
    ``attentions`` is ``[L, B, H, queries, keys]``."""
    picked = jnp.take_along_axis(jnp.asarray(attentions), rows[None, :, None, None, None], axis=3)
    return jnp.argmax(picked[:, :, :, 0], axis=-1)


def count_hits(top: np.ndarray, sentences: Sequence[Probed]) -> np.ndarray:
    """``[L, H]``: how many sentences have their top key (``top[l, b, h]``, from
    :func:`top_keys`) on one of their antecedent positions."""
    hits = np.zeros((top.shape[0], top.shape[2]))
    for b, sentence in enumerate(sentences):
        hits += np.isin(top[:, b], sentence.antecedents)
    return hits


def probe(
    model: EncoderForMLM,
    tokenizer: Tokenizer,
    examples: Sequence[anaphora.AnaphoraExample],
    *,
    batch_size: int = 64,
    name: str = "",
) -> ProbeResult:
    """Runs the probe over generated ``examples``, each mapped to tokens by :func:`encode`."""
    encoded = [encode(tokenizer, e) for e in examples]
    return probe_encoded(model, encoded, batch_size=batch_size, name=name)


def probe_encoded(
    model: EncoderForMLM, encoded: Sequence[Probed], *, batch_size: int = 64, name: str = ""
) -> ProbeResult:
    """Runs the probe over sentences already encoded (padded to one length, so one
    compilation)."""
    length = max(len(e.ids) for e in encoded)
    if length > model.config.max_block_size:
        raise ValueError(
            f"a probe sentence has {length} tokens, more than the model's "
            f"{model.config.max_block_size} positions"
        )
    graphdef, state = nnx.split(model)

    @jax.jit
    def top_keys_of(state, ids, mask, rows):
        _, aux = nnx.merge(graphdef, state)(ids, attention_mask=mask, return_attentions=True)
        return top_keys(jnp.stack(aux["attentions"]), rows)

    hits = np.zeros((model.config.num_layers, model.config.num_heads))
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        ids = np.full((batch_size, length), model.config.pad_token_id, np.int32)
        mask = np.zeros((batch_size, length), bool)
        rows = np.zeros(batch_size, np.int32)
        for i, e in enumerate(chunk):
            ids[i, : len(e.ids)], mask[i, : len(e.ids)], rows[i] = e.ids, True, e.reflexive
        mask[len(chunk) :, 0] = True  # filler rows attend somewhere; they are not counted
        hits += count_hits(np.asarray(top_keys_of(state, ids, mask, rows)), chunk)
    return ProbeResult(hits / len(encoded), len(encoded), name)


def format_table(result: ProbeResult) -> str:
    """Per-head percentages, one row per layer, with the layer's max and mean over heads."""
    layers, heads = result.accuracy.shape
    header = ["layer", *[f"h{h}" for h in range(heads)], "max", "mean"]
    lines = [
        f"{result.name}: reflexive -> antecedent, top attention, {result.sentences} sentences (%)"
    ]
    lines.append(" ".join(f"{h:>6}" for h in header))
    for layer in range(layers):
        cells = [*result.accuracy[layer], result.layer_max[layer], result.layer_mean[layer]]
        lines.append(" ".join([f"{layer:>6}", *[f"{100 * c:6.1f}" for c in cells]]))
    layer, head = result.best_head
    lines.append(
        f"best head: layer {layer} head {head} ({100 * result.accuracy[layer, head]:.1f}%); "
        f"mean over all heads {100 * result.accuracy.mean():.1f}%"
    )
    return "\n".join(lines)


def format_comparison(a: ProbeResult, b: ProbeResult) -> str:
    """Max and mean over heads per layer for two checkpoints, and their difference."""
    layers = max(a.accuracy.shape[0], b.accuracy.shape[0])  # models may differ in depth
    lines = [f"comparison (%): A = {a.name}, B = {b.name}"]
    lines.append(
        " ".join(f"{h:>8}" for h in ("layer", "max A", "max B", "B-A", "mean A", "mean B", "B-A"))
    )

    def cell(values: np.ndarray, layer: int) -> float:
        return float(values[layer]) if layer < len(values) else float("nan")

    for layer in range(layers):
        max_a, max_b = cell(a.layer_max, layer), cell(b.layer_max, layer)
        mean_a, mean_b = cell(a.layer_mean, layer), cell(b.layer_mean, layer)
        values = [max_a, max_b, max_b - max_a, mean_a, mean_b, mean_b - mean_a]
        lines.append(" ".join([f"{layer:>8}", *[f"{100 * v:8.1f}" for v in values]]))
    best = [100 * float(r.accuracy.max()) for r in (a, b)]
    mean = [100 * float(r.accuracy.mean()) for r in (a, b)]
    lines.append(
        f"{'all':>8} {best[0]:8.1f} {best[1]:8.1f} {best[1] - best[0]:8.1f} "
        f"{mean[0]:8.1f} {mean[1]:8.1f} {mean[1] - mean[0]:8.1f}"
    )
    return "\n".join(lines)


def run(
    workdir: str,
    *,
    compare: str | None = None,
    step: int | None = None,
    protocol: str = "extended",
    sentences: str | None = None,
    count: int | None = None,
    seed: int | None = None,
    variant: str | None = None,
    json_path: str | None = None,
) -> tuple[ProbeResult, ProbeResult | None, str]:
    """Probes the checkpoint of ``workdir`` (and of ``compare``) on the same sentences; returns
    the results and the printed report, also written as JSON to ``json_path`` if given.

    ``protocol`` extended generates ``count`` sentences (default 200) of ``variant`` (default
    both) from ``seed`` (default 0); reference reads the file ``sentences`` and draws its
    distractors from ``seed`` (default 42), and the report ends with ``kept=K of N sentences``.
    """
    if protocol not in reflexive.PROTOCOLS:
        raise ValueError(
            f"probe protocol must be one of {list(reflexive.PROTOCOLS)}, got {protocol!r}"
        )
    if protocol == "reference":
        if sentences is None:
            raise ValueError("the reference protocol reads its sentences from a file (--sentences)")
        if count is not None or variant is not None:
            raise ValueError("count and variant choose generated sentences: extended protocol only")
        lines = reflexive.read(sentences)
        seed = reflexive.DEFAULT_SEED if seed is None else seed
    elif sentences is not None:
        raise ValueError("a sentences file (--sentences) is for --protocol reference only")
    else:
        count = 200 if count is None else count
        seed = 0 if seed is None else seed
        examples = anaphora.generate(count, seed=seed, variant=variant or "both")
    results, sets = [], []
    for source in [workdir] + ([compare] if compare else []):
        loaded = weights.load(source, step)
        where = f"{as_path(source).name}" + ("" if loaded.step is None else f"@{loaded.step}")
        if protocol == "extended":
            results.append(probe(loaded.model, loaded.tokenizer, examples, name=where))
            continue
        sets.append(reflexive.encode(loaded.tokenizer, lines, seed=seed, source=sentences))
        if sets[-1].draws != sets[0].draws:
            raise ValueError(
                f"the tokenizers of {workdir} and {compare} keep different sentences of "
                f"{sentences} (or give them different clauses), so the reference protocol "
                f"cannot compare them"
            )
        results.append(probe_encoded(loaded.model, sets[-1].examples, name=where))
    report = "\n\n".join(format_table(r) for r in results)
    if compare:
        report += "\n\n" + format_comparison(results[0], results[1])
    if sets:
        report += "\n\n" + sets[0].summary()
    if json_path:
        payload: dict = {"probe": results[0].to_json()}
        if compare:
            payload["compare"] = results[1].to_json()
        if sets:
            payload["reference"] = {
                "sentences": str(sentences),
                "seed": seed,
                "read": sets[0].read,
                "kept": [{"line": line, "clause": clause} for line, clause in sets[0].draws],
            }
        as_path(json_path).write_text(json.dumps(payload, indent=2) + "\n")
    return results[0], results[1] if compare else None, report
