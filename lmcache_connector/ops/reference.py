"""Torch implementation of the block copies: the CPU path, and the oracle the kernels are tested against.

Runs of consecutive block ids are copied with one ``copy_`` per region, so a chunk whose blocks
are contiguous in the paged cache (the common case right after allocation) costs one memcpy per
layer; scattered ids fall back to ``index_select``/``index_copy_`` into the preallocated buffer,
on the rows seen as the widest integer words their alignment allows (indexed copies move one
element at a time: on uint8, ``index_copy_`` runs at a fifth of memcpy speed; on int64 it is close
to it). Nothing here allocates a buffer the size of the data.
"""

from __future__ import annotations

import torch

from lmcache_connector.ops.paged_kv import PagedKV

# Above this many runs per block, per-run copies cost more than one indexed copy per region.
_MAX_RUN_FRACTION = 0.5
_WORD_DTYPES = ((8, torch.int64), (4, torch.int32), (2, torch.int16))


def block_runs(block_ids: list[int]) -> list[tuple[int, int, int]]:
    """Split block ids into runs of consecutive ids: ``(first_block, chunk_position, length)``."""
    runs: list[tuple[int, int, int]] = []
    start = pos = 0
    for i in range(1, len(block_ids) + 1):
        if i == len(block_ids) or block_ids[i] != block_ids[i - 1] + 1:
            runs.append((block_ids[start], pos, i - start))
            pos += i - start
            start = i
    return runs


def gather_blocks_torch(paged: PagedKV, block_ids: list[int], out: torch.Tensor) -> None:
    """Copy blocks ``block_ids`` of every region into ``out[:, i]`` (``out`` is ``[R, n, row]``)."""
    runs = block_runs(block_ids)
    if len(runs) <= max(1, _MAX_RUN_FRACTION * len(block_ids)):
        for region, dst in zip(paged.regions, out, strict=True):
            for first, pos, length in runs:
                dst[pos : pos + length].copy_(region[first : first + length])
        return
    index = torch.tensor(block_ids, dtype=torch.long, device=paged.device)
    word = word_dtype(paged, out)
    for region, dst in zip(paged.regions, out, strict=True):
        # ``dst`` is one region of the chunk: n dense rows, contiguous even in a partial slot.
        torch.index_select(region.view(word), 0, index, out=dst.view(word))


def scatter_blocks_torch(chunk: torch.Tensor, paged: PagedKV, block_ids: list[int]) -> None:
    """Copy ``chunk[:, i]`` (``[R, n, row]``) into block ``block_ids[i]`` of every region."""
    runs = block_runs(block_ids)
    if len(runs) <= max(1, _MAX_RUN_FRACTION * len(block_ids)):
        for region, src in zip(paged.regions, chunk, strict=True):
            for first, pos, length in runs:
                region[first : first + length].copy_(src[pos : pos + length])
        return
    index = torch.tensor(block_ids, dtype=torch.long, device=paged.device)
    word = word_dtype(paged, chunk)
    for region, src in zip(paged.regions, chunk, strict=True):
        region.view(word).index_copy_(0, index, src.view(word))


def word_dtype(paged: PagedKV, chunk: torch.Tensor) -> torch.dtype:
    """Widest integer type whose size divides every offset, stride and row length of this copy."""
    values = [
        paged.row_bytes,
        paged.block_stride,
        paged.storage.storage_offset(),
        chunk.storage_offset(),
        chunk.stride(0),
        *paged.region_offsets,
    ]
    for size, dtype in _WORD_DTYPES:
        if all(v % size == 0 for v in values):
            return dtype
    return torch.uint8
