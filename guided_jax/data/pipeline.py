"""The training input pipeline: packed blocks → shuffled, per-host batches, with ``grain``.

The global stream of examples is every epoch of the blocks, each epoch shuffled by grain with
its own seed (``train.seed + epoch``), epochs back to back; training step ``s`` takes examples
``[s * B, (s + 1) * B)`` of it (a batch may straddle two epochs). A process feeds only its own
rows ``[a, a + k)`` of every global batch (those its devices hold, see
:func:`guided_jax.sharding.local_rows`): cutting the stream into groups of ``k`` examples, it
reads groups ``s * (B / k) + a / k``, i.e. shard ``a / k`` of ``B / k``. With data parallelism
over hosts that is shard ``jax.process_index()`` of ``jax.process_count()``; deriving it from the
rows keeps it right on any mesh. Every process thus reads disjoint rows, and the batches are
the same whatever the number of processes.

The blocks are a numpy array (the token cache's memmap) or, for a corpus prepared offline,
:class:`guided_jax.data.prepared.PreparedBlocks`: grain's ArrayRecord source then reads each of
this process's examples from its shard when the batch is cut, and no other.

The iterator is a ``grain`` dataset iterator: its state (the next step) goes into each orbax
checkpoint with ``grain.checkpoint.CheckpointSave`` and comes back with ``CheckpointRestore``,
so a resumed run sees exactly the batches an uninterrupted run would have.

With ``data.document_masks`` each example is ``[2, block_size]``: the block's token ids and its
document-start flags (:class:`BlocksWithStarts`), so batches are ``[rows, 2, block_size]``
(:func:`guided_jax.train.objective.split_batch` takes them apart); otherwise the flags are
never read.
"""

from __future__ import annotations

import grain
import numpy as np

from guided_jax.data.prepared import PreparedBlocks
from guided_jax.data.text import CorpusError


class BlocksWithStarts:
    """Random access to ``[2, block_size]`` int32 examples: a block's token ids over its
    document-start flags (both read from the token cache's memmaps only when asked for)."""

    def __init__(self, blocks: np.ndarray, starts: np.ndarray) -> None:
        if starts.shape != blocks.shape:
            raise ValueError(
                f"document-start flags of shape {starts.shape} do not match the blocks' "
                f"{blocks.shape}"
            )
        self.blocks, self.starts = blocks, starts
        self.shape = (blocks.shape[0], 2, blocks.shape[1])

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> np.ndarray:
        return np.stack([self.blocks[index], self.starts[index].astype(np.int32)])

    def rows(self, index: slice) -> np.ndarray:
        """Several examples at once, ``[k, 2, block_size]`` (for the fixed eval batches)."""
        return np.stack([self.blocks[index], self.starts[index].astype(np.int32)], axis=1)


def examples(
    blocks: np.ndarray | PreparedBlocks, starts: np.ndarray | PreparedBlocks | None
) -> np.ndarray | PreparedBlocks | BlocksWithStarts:
    """What batches are cut from: the blocks, or the blocks with their document starts (of a
    prepared corpus: both from one read of each record)."""
    if starts is None:
        return blocks
    if isinstance(blocks, PreparedBlocks) and blocks.same_rows(starts):
        return blocks.view("both")
    return BlocksWithStarts(blocks, starts)


def shard_of_rows(rows: slice, batch_size: int) -> tuple[int, int]:
    """``(shard_index, shard_count)`` of a process that feeds ``rows`` of each global batch."""
    start, stop = rows.start or 0, batch_size if rows.stop is None else rows.stop
    size = stop - start
    if size <= 0 or batch_size % size or start % size:
        raise ValueError(
            f"rows {start}:{stop} of a batch of {batch_size} are not one of equal shards"
        )
    return start // size, batch_size // size


def batch_dataset(
    blocks: np.ndarray | BlocksWithStarts,
    batch_size: int,
    seed: int,
    rows: slice | None = None,
) -> grain.MapDataset:
    """Step ``s`` → this process's ``rows`` of global batch ``s`` (all rows by default), as an
    endless random-access ``grain.MapDataset``. ``blocks`` may carry document starts
    (:func:`examples`)."""
    if len(blocks) < batch_size:
        raise CorpusError(
            f"corpus has {len(blocks)} blocks of {blocks.shape[-1]} tokens, fewer than one batch "
            f"of {batch_size}; use more text, a smaller data.block_size or train.batch_size"
        )
    if isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    index, count = shard_of_rows(rows or slice(0, batch_size), batch_size)
    examples = grain.MapDataset.source(blocks).shuffle(seed=seed).repeat()  # reseeds per epoch
    return examples.batch(batch_size // count)[index::count]


def train_iterator(
    blocks: np.ndarray,
    starts: np.ndarray | None,
    batch_size: int,
    seed: int,
    *,
    rows: slice | None = None,
    start_step: int = 0,
    prefetch: int = 2,
) -> grain.DatasetIterator:
    """The training batch iterator: each ``next()`` is the ``[rows, block_size]`` int32 numpy
    batch (this process's ``rows`` of the global batch of ``batch_size``; default all) of the
    next step, ``[rows, 2, block_size]`` with document ``starts`` (see the module docstring).

    This is the whole input pipeline after tokenization, with ``prefetch`` batches read ahead on
    background threads. To time it (examples/s of the input pipeline alone), build it and call
    ``next()`` in a loop. ``start_step`` starts at a later step (resuming without a saved
    iterator state); otherwise restore the state from a checkpoint."""
    steps = batch_dataset(examples(blocks, starts), batch_size, seed, rows)
    if start_step:
        steps = steps[start_step:]
    options = grain.ReadOptions(num_threads=min(prefetch, 4), prefetch_buffer_size=prefetch)
    return iter(steps.to_iter_dataset(options))
