"""The only code that touches KV bytes: copy whole blocks of all layers between vLLM's paged cache
and a contiguous chunk buffer, in both directions.

* :func:`gather_blocks` — paged cache → chunk buffer (a store);
* :func:`scatter_blocks` — chunk buffer → paged cache (a load).

One dispatch point: CUDA tensors go to the Triton kernels (one launch for every layer), CPU
tensors to the torch reference beside them. Block ids are validated before anything is copied,
so a bad id is an error, never a stray write.
"""

from __future__ import annotations

import torch

from lmcache_connector.ops.paged_kv import PagedKV
from lmcache_connector.ops.reference import gather_blocks_torch, scatter_blocks_torch

__all__ = ["PagedKV", "gather_blocks", "scatter_blocks", "check_block_ids"]


def check_block_ids(paged: PagedKV, block_ids: list[int], chunk: torch.Tensor) -> None:
    """Raise ``IndexError``/``ValueError`` unless the ids and the buffer fit the paged cache."""
    if chunk.dtype != torch.uint8 or chunk.dim() != 3:
        raise ValueError("chunk buffer must be a [regions, blocks, row_bytes] uint8 tensor")
    if tuple(chunk.shape) != paged.chunk_shape(len(block_ids)):
        raise ValueError(f"chunk buffer shape {tuple(chunk.shape)} does not match {paged.chunk_shape(len(block_ids))}")
    if chunk.stride(2) != 1 or chunk.stride(1) != paged.row_bytes:
        raise ValueError("chunk buffer rows must be dense (stride(1) == row_bytes, stride(2) == 1)")
    if block_ids and (min(block_ids) < 0 or max(block_ids) >= paged.num_blocks):
        bad = next(b for b in block_ids if not 0 <= b < paged.num_blocks)
        raise IndexError(f"block id {bad} is outside the paged KV cache (0..{paged.num_blocks - 1})")


def gather_blocks(paged: PagedKV, block_ids: list[int], out: torch.Tensor) -> None:
    """Copy the listed blocks of every layer into ``out`` (``[R, len(block_ids), row_bytes]``)."""
    check_block_ids(paged, block_ids, out)
    if not block_ids:
        return
    if paged.device.type == "cuda":
        from lmcache_connector.ops.triton_kernels import gather_blocks_triton

        gather_blocks_triton(paged, block_ids, out)
    else:
        gather_blocks_torch(paged, block_ids, out)


def scatter_blocks(chunk: torch.Tensor, paged: PagedKV, block_ids: list[int]) -> None:
    """Copy ``chunk`` (``[R, len(block_ids), row_bytes]``) into the listed blocks of every layer."""
    check_block_ids(paged, block_ids, chunk)
    if len(set(block_ids)) != len(block_ids):
        raise ValueError("block ids of one scatter must be distinct")
    if not block_ids:
        return
    if paged.device.type == "cuda":
        from lmcache_connector.ops.triton_kernels import scatter_blocks_triton

        scatter_blocks_triton(chunk, paged, block_ids)
    else:
        scatter_blocks_torch(chunk, paged, block_ids)
