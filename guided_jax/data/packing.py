"""Packing documents into fixed-length blocks, as the reference does, and cutting the blocks
into splits and fixed eval batches.

Packing mirrors the reference implementation (HuggingFace's old ``TextDataset``): all documents
are tokenized, concatenated into one token stream and cut into blocks of ``block_size`` tokens
that start with ``<s>`` and end with ``</s>`` (``[CLS]`` and ``[SEP]`` with a WordPiece
tokenizer), so no block is ever padded; the remainder that does not fill a block is dropped.
:class:`BlockPacker` does it as the documents stream in (the token cache writes its blocks to
disk as they come), and can also record where each document starts (``data.document_masks``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from guided_jax.data.prepared import PreparedBlocks
from guided_jax.data.text import CorpusError


class BlockPacker:
    """Cuts the token stream of documents, as they arrive, into ``[bos] + chunk + [eos]`` blocks
    of ``block_size`` (chunks of ``block_size - 2`` consecutive tokens), carrying the partial
    chunk over to the next call.

    ``bos``/``eos`` are the tokenizer's (``<s>``/``</s>`` for RoBERTa's BPE, ``[CLS]``/``[SEP]``
    for BERT's WordPiece), as the reference's ``build_inputs_with_special_tokens`` adds them.
    With ``starts=True`` each call also returns the blocks' document-start flags: ``uint8``, 1 at
    each document's first token (0 in the bos and eos columns; empty documents start nowhere).
    """

    def __init__(self, block_size: int, bos_id: int, eos_id: int, *, starts: bool = False):
        block_size = _positive_int(block_size, "block_size")
        if block_size < 3:
            raise ValueError(
                f"block_size must be at least 3 (bos, one token, eos), got {block_size}"
            )
        self.block_size, self.bos_id, self.eos_id = block_size, bos_id, eos_id
        self.with_starts = starts
        self.tokens = 0  # text tokens seen so far
        self.blocks = 0  # blocks returned so far
        self._carry = np.zeros(0, dtype=np.int32)
        self._carry_flags = np.zeros(0, dtype=np.uint8)

    @property
    def chunk(self) -> int:
        return self.block_size - 2

    def add(self, documents: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray | None]:
        """The ``[k, block_size]`` int32 blocks that these documents' ids complete, and their
        ``uint8`` start flags (None unless the packer records them)."""
        ids = [np.asarray(doc, dtype=np.int32).reshape(-1) for doc in documents]
        stream = np.concatenate([self._carry, *ids])
        self.tokens += stream.size - self._carry.size
        full = stream.size // self.chunk
        blocks = np.empty((full, self.block_size), dtype=np.int32)
        blocks[:, 0] = self.bos_id
        blocks[:, -1] = self.eos_id
        blocks[:, 1:-1] = stream[: full * self.chunk].reshape(full, self.chunk)
        self._carry = stream[full * self.chunk :]
        self.blocks += full
        if not self.with_starts:
            return blocks, None
        flags = np.concatenate([self._carry_flags, start_flags([len(x) for x in ids])])
        starts = np.zeros((full, self.block_size), dtype=np.uint8)
        starts[:, 1:-1] = flags[: full * self.chunk].reshape(full, self.chunk)
        self._carry_flags = flags[full * self.chunk :]
        return blocks, starts

    def check_not_empty(self) -> None:
        """Raises when the whole stream did not fill one block."""
        if self.blocks == 0:
            raise CorpusError(
                f"corpus has only {self.tokens} tokens, fewer than one block of block_size "
                f"{self.block_size} ({self.chunk} text tokens + bos + eos); use more text or a "
                "smaller data.block_size"
            )


def start_flags(lengths: Sequence[int]) -> np.ndarray:
    """The uint8 flag stream of documents of these token ``lengths`` run together: 1 at each
    document's first token (documents without tokens start nowhere)."""
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    flags = np.zeros(int(lengths.sum()), dtype=np.uint8)
    firsts = np.cumsum(lengths) - lengths
    flags[firsts[lengths > 0]] = 1
    return flags


def split_blocks(blocks: np.ndarray, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Split blocks into (train, eval), holding out the last ``ceil(eval_fraction * N)`` blocks.

    The held-out blocks are the contiguous tail of the token stream, so no text is shared
    between the two parts (apart from what the corpus itself repeats).
    """
    blocks = _as_blocks(blocks)
    if not 0.0 <= eval_fraction < 1.0 or math.isnan(eval_fraction):
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(blocks)
    # Rounding first keeps e.g. 0.3 * 10 = 3.0000000000000004 from becoming 4 blocks.
    n_eval = math.ceil(round(eval_fraction * n, 9))
    if n - n_eval < 1:
        raise CorpusError(
            f"eval_fraction {eval_fraction} of {n} blocks leaves no training block; use more text "
            "or a smaller eval fraction"
        )
    return blocks[: n - n_eval], blocks[n - n_eval :]


def eval_batches(
    blocks: np.ndarray, batch_size: int, max_batches: int | None = None
) -> list[np.ndarray]:
    """Return fixed, in-order evaluation batches so every evaluation sees the same data.

    Only full batches are used (the last partial batch is dropped) so that every batch has the
    same shape; if there are fewer blocks than one batch, they form a single smaller batch.
    ``max_batches=None`` means no limit.
    """
    blocks = _as_blocks(blocks, allow_empty=True)
    batch_size = _positive_int(batch_size, "batch_size")
    if max_batches is not None and (isinstance(max_batches, bool) or max_batches < 0):
        raise ValueError(f"max_batches must be None or a non-negative integer, got {max_batches}")
    n = len(blocks)
    if n == 0 or max_batches == 0:
        return []
    if n < batch_size:
        return [blocks.copy()]
    num = n // batch_size
    if max_batches is not None:
        num = min(num, max_batches)
    return [blocks[i * batch_size : (i + 1) * batch_size].copy() for i in range(num)]


def _positive_int(value: int, name: str) -> int:
    """Return ``value`` as int, rejecting bools, non-integers and values below 1."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _as_blocks(blocks: np.ndarray, allow_empty: bool = False) -> np.ndarray:
    """Check that ``blocks`` is a 2-D ``[num_blocks, block_size]`` array (blocks prepared
    offline stay on disk: they are read only when a batch needs them)."""
    if not isinstance(blocks, PreparedBlocks):
        blocks = np.asarray(blocks)
    if blocks.ndim != 2:
        raise ValueError(f"blocks must be a 2-D [num_blocks, block_size] array, got {blocks.shape}")
    if len(blocks) == 0 and not allow_empty:
        raise CorpusError("there are no blocks; use more text or a smaller data.block_size")
    return blocks
