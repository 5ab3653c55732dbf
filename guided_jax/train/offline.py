"""A config's corpus tokenized and packed once, offline, with Apache Beam
(``python -m guided_jax.prepare``), where a run with ``data.cache_dir`` set to the same
directory finds it: the tokenizer under ``tokenizers/<key>/`` and each entry (train, and eval
when ``data.eval_files`` is set) under the key that the run computes (docs/DESIGN.md §4)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import ml_collections
import numpy as np
from etils import epath

from guided_jax.config.checks import check_resolved_config
from guided_jax.config.resolve import resolve_config
from guided_jax.data import sources, token_cache
from guided_jax.data.prepared import token_dtype
from guided_jax.data.text import reads_whole_files
from guided_jax.data.tokenizer import Tokenizer, load_tokenizer
from guided_jax.storage import as_path, check_location
from guided_jax.train.inputs import (
    corpus_sources,
    is_complete_tokenizer,
    prepared_tokenizer_dir,
    train_run_tokenizer,
)

if TYPE_CHECKING:  # apache-beam is an optional extra: imported where a pipeline is built
    from guided_jax.data.beam_pipeline import Job, ReadUnit


@dataclasses.dataclass(frozen=True)
class PreparedEntry:
    """One prepared entry, as its meta.json describes it."""

    what: str  # train or eval
    path: str
    shards: int
    blocks: int
    tokens: int
    dtype: str
    reused: bool  # complete from an earlier prepare: nothing ran for it

    def line(self) -> str:
        done = "already prepared" if self.reused else "prepared"
        return (
            f"{self.what}: {done} {self.shards} shards, {self.blocks} blocks, {self.tokens} "
            f"tokens ({self.dtype}) in {self.path}"
        )


def prepare_offline(
    config: ml_collections.ConfigDict,
    out: str | os.PathLike,
    pipeline_args: Sequence[str],
    *,
    num_shards: int = 0,
    worker_output: bool = True,
) -> tuple[str, list[PreparedEntry]]:
    """Prepares ``config``'s corpus into ``out`` with one Beam pipeline, run with
    ``pipeline_args`` (an entry already complete there is kept); returns the tokenizer's
    directory and the entries. Every check comes first, then the tokenizer. Without
    ``worker_output``, what the pipeline prints on stderr is dropped (a failure still comes
    back as an exception that carries its message)."""
    beam_pipeline = _beam_pipeline()
    check_location(out, "--out")
    options = beam_pipeline.pipeline_options(pipeline_args)
    if num_shards < 0:
        raise ValueError(f"--num_shards must be 0 (one per 128 MiB) or more, got {num_shards}")
    config, _ = resolve_config(config)
    check_resolved_config(config)
    root = as_path(out)
    parts = [("train", corpus_sources(config, "train_files"))]
    if eval_sources := corpus_sources(config, "eval_files"):
        parts.append(("eval", eval_sources))
    units = {what: beam_pipeline.read_units(found) for what, found in parts}  # checks sources
    tokenizer, tokenizer_dir = _tokenizer(config, root, parts[0][1])
    jobs = [
        _job(config, root, tokenizer, what, found, units[what], num_shards) for what, found in parts
    ]
    done = [token_cache.load(job.out) is not None for job in jobs]
    todo = [job for job, complete in zip(jobs, done, strict=True) if not complete]
    if todo:
        beam_pipeline.run(todo, options, worker_output=worker_output)
    return tokenizer_dir, [_entry(job, reused=d) for job, d in zip(jobs, done, strict=True)]


def _beam_pipeline():
    """:mod:`guided_jax.data.beam_pipeline`, or what to install when Apache Beam is missing."""
    try:
        from guided_jax.data import beam_pipeline
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith("apache_beam"):
            raise
        raise ValueError(
            "preparing a corpus runs an Apache Beam pipeline, and apache-beam is not installed: "
            "pip install -e '.[prepare]'"
        ) from None
    return beam_pipeline


def _tokenizer(
    config: ml_collections.ConfigDict, root: epath.Path, train_sources: list[sources.Source]
) -> tuple[Tokenizer, str]:
    """``data.tokenizer_dir``'s tokenizer, or the one a run of this config trains, trained once
    into ``OUT/tokenizers/<key>/`` (where such a run looks for it)."""
    if config.data.tokenizer_dir:
        return load_tokenizer(config.data.tokenizer_dir), str(config.data.tokenizer_dir)
    directory = prepared_tokenizer_dir(config, root, train_sources)
    if is_complete_tokenizer(directory):
        return load_tokenizer(directory), str(directory)
    return train_run_tokenizer(config, train_sources, directory), str(directory)


def _job(
    config: ml_collections.ConfigDict,
    root: epath.Path,
    tokenizer: Tokenizer,
    what: str,
    found: list[sources.Source],
    units: list[tuple[tuple[int, int], ReadUnit]],
    num_shards: int,
) -> Job:
    """The pipeline's job for one entry, keyed exactly as a run keys its token cache entry."""
    from guided_jax.data import beam_pipeline

    reference = reads_whole_files(config.data)
    separator = "" if reference else "\n"  # as guided_jax.train.inputs packs
    with_starts = bool(config.data.get("document_masks", False))
    key, meta = token_cache.cache_key(
        tokenizer,
        sources.fingerprint(found),
        config.data.block_size,
        separator=separator,
        document_starts=with_starts,
    )
    return beam_pipeline.Job(
        label=what,
        units=units,
        tokenizer_files=beam_pipeline.tokenizer_files(tokenizer),
        block_size=config.data.block_size,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        separator=separator,
        reference_text=reference,
        document_starts=with_starts,
        dtype=token_dtype(tokenizer.vocab_size).str,
        num_shards=num_shards,
        out=str(root / key),
        meta={**meta, "what": what, "described": [s.describe() for s in found]},
    )


def _entry(job: Job, *, reused: bool) -> PreparedEntry:
    meta = token_cache.read_meta(job.out)
    return PreparedEntry(
        what=job.label,
        path=job.out,
        shards=len(meta["shards"]),
        blocks=int(meta["num_blocks"]),
        tokens=int(meta["tokens"]),
        dtype=np.dtype(meta["dtype"]).name,
        reused=reused,
    )
