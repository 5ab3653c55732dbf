"""A run's inputs, prepared before its first step and checked before a file is written.

:func:`prepare` resolves the config (``model.from_dir``, the tokenizer kind), checks every value,
refuses a workdir that holds another config's run, loads or trains the tokenizer, reads and
packs the corpus into the token cache, and only then writes ``WORKDIR/config.json`` (the
resolved config) and ``WORKDIR/tokenizer/``.

A corpus prepared offline (``python -m guided_jax.prepare --out DIR``, then
``data.cache_dir=DIR``) is found in the cache like any entry, with the tokenizer that prepared
it, and nothing is tokenized; every process reads its own rows from the shards. Without one,
more than ``data.max_inline_bytes`` of text files is refused before anything is written.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import ml_collections
import numpy as np
from etils import epath

from guided_jax.config.checks import check_resolved_config, check_schedule
from guided_jax.config.resolve import (
    ConfigError,
    build_model_config,
    check_model_dir_tokenizer,
    check_workdir,
    head_spec,
    resolve_config,
    steps_for_epochs,
    vocab_resize_note,
)
from guided_jax.data import sources, token_cache
from guided_jax.data.packing import split_blocks
from guided_jax.data.pipeline import batch_dataset
from guided_jax.data.prepared import PreparedBlocks
from guided_jax.data.text import REFERENCE_TEXT, reads_whole_files
from guided_jax.data.tokenizer import (
    CONFIG_FILE,
    Tokenizer,
    has_tokenizer_files,
    load_tokenizer,
    train_tokenizer,
)
from guided_jax.guidance import Spec
from guided_jax.model import ModelConfig
from guided_jax.storage import as_path, copy_tree, is_remote
from guided_jax.train.objective import Objective
from guided_jax.weights.workdir import keep_run_patterns


@dataclasses.dataclass(frozen=True)
class RunInputs:
    """A run's inputs, resolved and checked from the config and the corpus before a file is
    written: the config as recorded, the typed model, the head spec, the tokenizer, the packed
    blocks (memory-mapped from the token cache) and the objective the compiled steps read."""

    config: ml_collections.ConfigDict
    model: ModelConfig
    spec: Spec | None  # a HeadSpec, or a LayeredSpec for "layers=..." specs
    token_ids: tuple[int, ...]
    tokenizer: Tokenizer
    # [N, block_size] int32: a read-only memmap of the token cache, or the records of a
    # prepared corpus (PreparedBlocks, read when a batch needs them)
    train_blocks: np.ndarray | PreparedBlocks
    eval_blocks: np.ndarray | PreparedBlocks
    objective: Objective
    # [N, block_size] uint8, 1 where a document starts; only with data.document_masks.
    train_starts: np.ndarray | None = None
    eval_starts: np.ndarray | None = None


def corpus_sources(config: ml_collections.ConfigDict, key: str) -> list[sources.Source]:
    """The sources of ``data.<key>`` (see :mod:`guided_jax.data.sources`); an empty train value is
    the embedded default corpus, an empty eval value none."""
    found = sources.parse_sources(config.data[key], f"data.{key}", config.data)
    if not found and key == "train_files":
        if reads_whole_files(config.data):
            raise ConfigError(
                f"data.format={REFERENCE_TEXT!r} reads text files whole, as the reference does; "
                f"set data.train_files (the embedded default corpus is a set of documents)"
            )
        return [sources.DefaultCorpus()]
    return found


@dataclasses.dataclass(frozen=True)
class _FoundTokenizer:
    """The run's tokenizer, and the directory to copy into WORKDIR/tokenizer once every check
    passed (None: nothing to copy), a temporary one of this run's when ``scratch``."""

    tokenizer: Tokenizer
    copy_from: str | os.PathLike | None = None
    scratch: bool = False


def is_complete_tokenizer(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a whole tokenizer (tokenizer_config.json is copied last:
    without it the copy was cut short and is redone)."""
    return has_tokenizer_files(directory) and (as_path(directory) / CONFIG_FILE).is_file()


def prepared_tokenizer_dir(
    config: ml_collections.ConfigDict, cache: epath.Path, train_sources: list[sources.Source]
) -> epath.Path:
    """Where ``python -m guided_jax.prepare`` keeps the tokenizer this config trains: under the
    cache directory, named by what trains it (:func:`token_cache.tokenizer_key`)."""
    key = token_cache.tokenizer_key(
        config.data.tokenizer_kind,
        config.data.tokenizer_vocab_size,
        config.data.tokenizer_max_documents,
        config.train.seed,
        sources.fingerprint(train_sources),
    )
    return cache / token_cache.TOKENIZERS / key


def train_run_tokenizer(
    config: ml_collections.ConfigDict, train_sources: list[sources.Source], out: str | os.PathLike
) -> Tokenizer:
    """The tokenizer a run trains: on (a sample of ``data.tokenizer_max_documents`` documents
    drawn with ``train.seed`` from) the training sources, written to ``out``."""
    texts = sources.sample_documents(
        train_sources, config.data.tokenizer_max_documents, config.train.seed
    )
    kind = config.data.tokenizer_kind
    return train_tokenizer(texts, config.data.tokenizer_vocab_size, out, kind=kind)


def _tokenizer(
    config: ml_collections.ConfigDict, workdir: epath.Path, train_sources: list[sources.Source]
) -> _FoundTokenizer:
    """The configured tokenizer, the one of a previous run in WORKDIR, the one the prepare
    command trained for this config in the cache directory, or a new one trained on the
    training sources into a temporary directory (moved into WORKDIR once every check
    passed)."""
    if config.data.tokenizer_dir:
        return _FoundTokenizer(load_tokenizer(config.data.tokenizer_dir))
    if is_complete_tokenizer(workdir / "tokenizer"):
        tokenizer = load_tokenizer(workdir / "tokenizer")
        if tokenizer.kind != config.data.tokenizer_kind:
            raise ConfigError(
                f"workdir {workdir} holds a {tokenizer.kind} tokenizer, but data.tokenizer_kind="
                f"{config.data.tokenizer_kind!r}; use a new --workdir or the same kind"
            )
        return _FoundTokenizer(tokenizer)
    prepared = prepared_tokenizer_dir(config, cache_dir(config, workdir), train_sources)
    if is_complete_tokenizer(prepared):
        return _FoundTokenizer(load_tokenizer(prepared), copy_from=prepared)
    check_inline_size(config, train_sources, "train_files")
    scratch = tempfile.mkdtemp(prefix="guided_jax_tokenizer_")
    return _FoundTokenizer(train_run_tokenizer(config, train_sources, scratch), scratch, True)


def check_inline_size(
    config: ml_collections.ConfigDict, found: list[sources.Source], key: str
) -> None:
    """Refuses to tokenize in this process more than ``data.max_inline_bytes`` of text files:
    that is the prepare command's work, spread over many workers."""
    limit = int(config.data.get("max_inline_bytes", 0))
    size = sources.text_bytes(found)
    if limit <= 0 or size <= limit:
        return
    raise ConfigError(
        f"data.{key} holds {size:,} bytes of text, more than data.max_inline_bytes={limit:,} "
        f"that one process tokenizes at the start of a run; tokenize it once with `python -m "
        f"guided_jax.prepare --config CONFIG --out DIR` (this run's --config and --config.data.* "
        f"flags) and train with --config.data.cache_dir=DIR, or raise data.max_inline_bytes"
    )


def cache_dir(config: ml_collections.ConfigDict, workdir: epath.Path) -> epath.Path:
    """Where token cache entries live: ``data.cache_dir``, by default ``WORKDIR/token_cache``
    (local or ``gs://``)."""
    return as_path(config.data.cache_dir) if config.data.cache_dir else workdir / "token_cache"


class _Blocks:
    """The packed blocks of some sources: found in the token cache, or built into a scratch
    directory that :meth:`keep` moves into the cache once every check passed."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: epath.Path,
        tokenizer: Tokenizer,
        found: list[sources.Source],
        what: str,
    ) -> None:
        self.scratch: Path | None = None
        self.with_starts = bool(config.data.get("document_masks", False))
        reference = reads_whole_files(config.data)
        separator = "" if reference else "\n"  # whole files keep their own newlines
        self.starts: np.ndarray | None = None
        block_size = config.data.block_size
        if len(found) == 1 and isinstance(found[0], sources.CachedBlocks):
            path = found[0].path
            self.blocks = _cached_source_blocks(path, tokenizer, block_size)
            if self.with_starts:
                self.starts = token_cache.load_starts(path)
                if self.starts is None:
                    raise ConfigError(
                        f"token cache {path!r} records no document starts, which "
                        f"data.document_masks=true needs; use the text sources themselves (the "
                        f"run builds a cache entry with them) or set data.document_masks=false"
                    )
            return
        self.key, meta = token_cache.cache_key(
            tokenizer,
            sources.fingerprint(found),
            block_size,
            separator=separator,
            document_starts=self.with_starts,
        )
        self.final = cache_dir(config, workdir) / self.key
        blocks = token_cache.load(self.final)
        if blocks is not None:
            self.blocks = blocks
            self.starts = self._load_starts()
            return
        check_inline_size(config, found, f"{what}_files")
        local_parent = not is_remote(self.final) and self.final.parent.is_dir()
        parent = self.final.parent if local_parent else None
        self.scratch = Path(tempfile.mkdtemp(prefix="guided_jax_tokens_", dir=parent))
        try:
            self.blocks = token_cache.build(
                sources.documents(found),
                tokenizer,
                block_size,
                self.scratch / self.key,
                {**meta, "what": what, "described": [s.describe() for s in found]},
                total=sources.count_documents(found),
                separator=separator,
                description=f"tokenize {what}",
                document_starts=self.with_starts,
                reference_text=reference,
            )
            if self.with_starts:
                self.starts = token_cache.load_starts(self.scratch / self.key)
        except BaseException:
            shutil.rmtree(self.scratch, ignore_errors=True)
            raise

    def keep(self) -> np.ndarray:
        """Moves a freshly built entry into the cache and returns its blocks from there."""
        if self.scratch is not None:
            token_cache.publish(self.scratch / self.key, self.final)
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None
            loaded = token_cache.load(self.final)
            assert loaded is not None
            self.blocks = loaded
            self.starts = self._load_starts()
        return self.blocks

    def _load_starts(self) -> np.ndarray | None:
        """The entry's document-start flags when the config asks for them."""
        if not self.with_starts:
            return None
        starts = token_cache.load_starts(self.final)
        assert starts is not None  # the key of an entry with starts differs from one without
        return starts

    def discard(self) -> None:
        """Removes the scratch directory (its blocks are copied into memory first)."""
        if self.scratch is not None:
            self.blocks = np.array(self.blocks)
            self.starts = None if self.starts is None else np.array(self.starts)
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None


def _cached_source_blocks(path: str, tokenizer: Tokenizer, block_size: int) -> np.ndarray:
    """The blocks of a ``cache:DIR`` source, checked against the tokenizer and block size."""
    meta = token_cache.read_meta(path)
    if meta.get("block_size") != block_size:
        raise ConfigError(
            f"token cache {path!r} holds blocks of {meta.get('block_size')}, but "
            f"data.block_size={block_size}"
        )
    if meta.get("tokenizer") != token_cache.tokenizer_fingerprint(tokenizer):
        raise ConfigError(
            f"token cache {path!r} was made with another tokenizer than the one in "
            f"{str(tokenizer.directory)!r}; set data.tokenizer_dir to the tokenizer that built it"
        )
    blocks = token_cache.load(path)
    assert blocks is not None
    return blocks


def prepare(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, write: bool = True
) -> RunInputs:
    """Resolves config, tokenizer and data; raises before writing anything on bad input.

    The corpus is tokenized once into the token cache (:func:`cache_dir`); a rerun finds it
    there and reads nothing else. ``write=False`` (every process but the first of a multi-host
    run) only reads WORKDIR and the cache."""
    workdir = as_path(workdir)
    config, model_dir = resolve_config(config)
    check_resolved_config(config)
    check_workdir(config, workdir)
    note = vocab_resize_note(config, model_dir)
    if note and write:
        print(note)
    train_sources = corpus_sources(config, "train_files")
    eval_sources = corpus_sources(config, "eval_files")
    found = _tokenizer(config, workdir, train_sources)
    tokenizer = found.tokenizer
    built: list[_Blocks] = []
    try:
        if model_dir is not None:
            check_model_dir_tokenizer(model_dir, tokenizer)
        model = build_model_config(config, tokenizer.vocab_size, tokenizer.pad_id)
        spec = head_spec(config)
        token_ids = spec.token_ids(tokenizer) if spec is not None else ()
        built.append(_Blocks(config, workdir, tokenizer, train_sources, "train"))
        if eval_sources:
            built.append(_Blocks(config, workdir, tokenizer, eval_sources, "eval"))
        # A corpus smaller than one batch fails here, before anything is written.
        train_count = len(_split(config, [b.blocks for b in built])[0])
        if config.train.epochs > 0:
            _count_steps(config, train_count, say=write)
        if write:
            workdir.mkdir(parents=True, exist_ok=True)
            if found.copy_from is not None:
                copy_tree(found.copy_from, workdir / "tokenizer", last=CONFIG_FILE)
                tokenizer = load_tokenizer(workdir / "tokenizer")
            for part in built:
                part.keep()
            keep_run_patterns(spec, workdir)
            (workdir / "config.json").write_text(config.to_json(indent=2))
    finally:
        if found.scratch and found.copy_from is not None:
            shutil.rmtree(found.copy_from, ignore_errors=True)
        for part in built:
            part.discard()
    train_blocks, eval_blocks = _split(config, [b.blocks for b in built])
    starts: tuple[np.ndarray | None, np.ndarray | None] = (None, None)
    if config.data.get("document_masks", False):
        starts = _split(config, [b.starts for b in built])
    objective = Objective.from_config(
        config,
        vocab_size=tokenizer.vocab_size,
        mask_id=tokenizer.mask_id,
        special_ids=tokenizer.special_ids,
        pad_id=model.pad_token_id,
        spec=spec,
        token_ids=token_ids,
    )
    return RunInputs(
        config, model, spec, token_ids, tokenizer, train_blocks, eval_blocks, objective, *starts
    )


def _count_steps(config: ml_collections.ConfigDict, blocks: int, *, say: bool) -> None:
    """Sets ``train.steps`` from ``train.epochs`` over ``blocks`` training blocks."""
    train = config.train
    train.steps = steps_for_epochs(blocks, train.batch_size, train.grad_accum_steps, train.epochs)
    if train.steps == 0:
        raise ConfigError(
            f"train.epochs={train.epochs:g} over {blocks} training blocks at a batch of "
            f"{train.batch_size} makes no optimizer step; raise train.epochs"
        )
    check_schedule(config)
    if say:
        print(
            f"train.steps={train.steps}: {train.epochs:g} epochs of {blocks} training blocks at a "
            f"global batch of {train.batch_size}"
        )


def _split(
    config: ml_collections.ConfigDict, parts: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) blocks: a separate eval corpus, or the tail of the training blocks (none
    with data.format=reference_text: the reference trains on every block)."""
    if len(parts) == 2:
        train_blocks, eval_blocks = parts
    elif reads_whole_files(config.data):
        train_blocks, eval_blocks = parts[0], parts[0][:0]
    else:
        train_blocks, eval_blocks = split_blocks(parts[0], config.data.eval_fraction)
    batch_dataset(train_blocks, config.train.batch_size, config.train.seed)
    return train_blocks, eval_blocks
