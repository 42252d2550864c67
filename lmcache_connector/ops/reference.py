"""Torch implementation of the block copies: the CPU path, and the oracle the kernels are tested against.

Runs of consecutive block ids are copied with one ``copy_`` per region, so a chunk whose blocks
are contiguous in the paged cache (the common case right after allocation) costs one memcpy per
layer; scattered ids fall back to ``index_select``/``index_copy_`` into the preallocated buffer.
Nothing here allocates a buffer the size of the data.
"""

from __future__ import annotations

import torch

from .paged_kv import PagedKV

# Above this many runs per block, per-run copies cost more than one indexed copy per region.
_MAX_RUN_FRACTION = 0.5


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
        for region, dst in zip(paged.regions, out):
            for first, pos, length in runs:
                dst[pos : pos + length].copy_(region[first : first + length])
        return
    index = torch.tensor(block_ids, dtype=torch.long, device=paged.device)
    for region, dst in zip(paged.regions, out):
        if dst.is_contiguous():
            torch.index_select(region, 0, index, out=dst)
        else:
            dst.copy_(region.index_select(0, index))


def scatter_blocks_torch(chunk: torch.Tensor, paged: PagedKV, block_ids: list[int]) -> None:
    """Copy ``chunk[:, i]`` (``[R, n, row]``) into block ``block_ids[i]`` of every region."""
    runs = block_runs(block_ids)
    if len(runs) <= max(1, _MAX_RUN_FRACTION * len(block_ids)):
        for region, src in zip(paged.regions, chunk):
            for first, pos, length in runs:
                region[first : first + length].copy_(src[pos : pos + length])
        return
    index = torch.tensor(block_ids, dtype=torch.long, device=paged.device)
    for region, src in zip(paged.regions, chunk):
        region.index_copy_(0, index, src)
