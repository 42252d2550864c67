"""Triton kernels for the block copies: one launch moves the listed blocks of every layer.

The torch references are :func:`.reference.gather_blocks_torch` and
:func:`.reference.scatter_blocks_torch` (the CPU path, and the oracle the tests compare against);
these functions take the same arguments and promise the same bytes.

Program ``(j, r, t)`` copies tile ``t`` of region ``r``'s row for the ``j``-th listed block, so one
launch covers all layers (or heads, for per-head regions) and the grid needs no division. Rows are
moved as raw bytes, read through the widest integer type that every address allows (16 bytes
when storage, offsets, strides and row size are multiples of 16: two int64 per access, which the
compiler emits as one 128-bit load or store), so every dtype and layout is copied alike.

Block ids travel as a small int32 device tensor made per call (through pinned memory, so the copy
is asynchronous and ordered on the launching stream); a single run of consecutive ids needs no
tensor at all. Region offsets are uploaded once per paged cache and kept.

Callers validate ids first (:func:`lmcache_connector.ops.check_block_ids`): these functions
trust them. Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors, which is how they are
tested on machines without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmcache_connector.ops.paged_kv import PagedKV

__all__ = ["gather_blocks_triton", "scatter_blocks_triton", "copy_unit_bytes"]

# Bytes one program copies on a GPU. 16 KiB is 8 sixteen-byte accesses per thread at 4 warps:
# enough in flight per thread to cover memory latency, and a 64 KiB row (7B-class LBNHC page)
# still spreads over 4 programs so one chunk fills the machine.
GPU_TILE_BYTES = 16 * 1024
GPU_NUM_WARPS = 4
# The interpreter pays per program instance (milliseconds), not per byte: one program per row.
INTERPRETER_TILE_BYTES = 1 << 22

_UNIT_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
_REGION_OFFSETS_CACHE: dict[tuple, torch.Tensor] = {}
_REGION_OFFSETS_CACHE_SIZE = 16  # a process has one KV cache; tests and benchmarks build many


# first_block is not specialized on: block 1 would otherwise compile a kernel of its own.
@triton.jit(do_not_specialize=["first_block"])
def _copy_blocks_kernel(
    paged_ptr,
    region_offsets_ptr,
    block_ids_ptr,
    chunk_ptr,
    first_block,
    block_stride,
    chunk_region_stride,
    row,
    TILE: tl.constexpr,
    ALIGN: tl.constexpr,
    EVEN_TILES: tl.constexpr,
    CONTIGUOUS_IDS: tl.constexpr,
    GATHER: tl.constexpr,
):
    # All offsets are in copy units (int64/int32/int16/uint8 elements), never in bytes. The row
    # length is a run-time value so that caches of different shapes share one compiled kernel.
    pos = tl.program_id(0)
    region = tl.program_id(1)
    tile = tl.program_id(2)
    if CONTIGUOUS_IDS:
        block = (first_block + pos).to(tl.int64)
    else:
        block = tl.load(block_ids_ptr + pos).to(tl.int64)
    paged_start = tl.load(region_offsets_ptr + region) + block * block_stride
    chunk_start = region.to(tl.int64) * chunk_region_stride + pos.to(tl.int64) * row
    # ALIGN units = 16 bytes: lets the compiler use 128-bit accesses for two int64 per thread.
    paged_start = tl.multiple_of(paged_start, ALIGN)
    chunk_start = tl.multiple_of(chunk_start, ALIGN)
    cols = tile * TILE + tl.arange(0, TILE)
    if GATHER:
        src = paged_ptr + paged_start + cols
        dst = chunk_ptr + chunk_start + cols
    else:
        src = chunk_ptr + chunk_start + cols
        dst = paged_ptr + paged_start + cols
    if EVEN_TILES:
        tl.store(dst, tl.load(src))
    else:
        mask = cols < row
        tl.store(dst, tl.load(src, mask=mask), mask=mask)


def copy_unit_bytes(paged: PagedKV, chunk: torch.Tensor) -> int:
    """Widest access (16, 8, 4, 2 or 1 bytes) that every address of this copy is aligned to."""
    values = [
        paged.storage.data_ptr(),
        paged.block_stride,
        paged.row_bytes,
        chunk.data_ptr(),
        chunk.stride(0),
        *paged.region_offsets,
    ]
    unit = 16
    while unit > 1 and any(v % unit for v in values):
        unit //= 2
    return unit


def gather_blocks_triton(
    paged: PagedKV,
    block_ids: list[int],
    out: torch.Tensor,
    *,
    tile_bytes: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Copy blocks ``block_ids`` of every region into ``out`` (``[R, n, row]``) in one launch."""
    _launch(paged, block_ids, out, gather=True, tile_bytes=tile_bytes, num_warps=num_warps)


def scatter_blocks_triton(
    chunk: torch.Tensor,
    paged: PagedKV,
    block_ids: list[int],
    *,
    tile_bytes: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Copy ``chunk`` (``[R, n, row]``) into blocks ``block_ids`` of every region in one launch."""
    _launch(paged, block_ids, chunk, gather=False, tile_bytes=tile_bytes, num_warps=num_warps)


def _launch(
    paged: PagedKV,
    block_ids: list[int],
    chunk: torch.Tensor,
    *,
    gather: bool,
    tile_bytes: int | None,
    num_warps: int | None,
) -> None:
    if not block_ids:
        return
    unit = copy_unit_bytes(paged, chunk)
    elem = min(unit, 8)
    dtype = _UNIT_DTYPES[elem]
    paged_units = _as_units(paged.storage, dtype)
    chunk_units = chunk.view(dtype)
    row = paged.row_bytes // elem

    interpreted = paged.device.type != "cuda"
    if tile_bytes is None:
        tile_bytes = INTERPRETER_TILE_BYTES if interpreted else GPU_TILE_BYTES
    # A power of two (tl.arange needs one), no larger than the row needs.
    tile = min(triton.next_power_of_2(row), 1 << (max(1, tile_bytes // elem).bit_length() - 1))

    contiguous = all(b == block_ids[0] + i for i, b in enumerate(block_ids))
    region_offsets = _region_offsets(paged, elem)
    ids = region_offsets if contiguous else _block_ids_tensor(block_ids, paged.device)

    grid = (len(block_ids), paged.num_regions, triton.cdiv(row, tile))
    _copy_blocks_kernel[grid](
        paged_units,
        region_offsets,
        ids,
        chunk_units,
        block_ids[0],
        paged.block_stride // elem,
        chunk_units.stride(0),
        row,
        TILE=tile,
        ALIGN=unit // elem,
        EVEN_TILES=row % tile == 0,
        CONTIGUOUS_IDS=contiguous,
        GATHER=gather,
        num_warps=num_warps or GPU_NUM_WARPS,
    )


def _as_units(storage: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The flat uint8 storage seen as ``dtype`` elements (its tail bytes beyond the last whole one dropped).

    Every row starts and ends on a unit boundary (checked by :func:`copy_unit_bytes`), so the
    dropped tail never holds a row's bytes.
    """
    elem = torch.empty(0, dtype=dtype).element_size()
    if elem == 1:
        return storage
    return storage[: storage.numel() - storage.numel() % elem].view(dtype)


def _region_offsets(paged: PagedKV, elem: int) -> torch.Tensor:
    """Region start offsets in copy units, as an int64 device tensor uploaded once per cache."""
    key = (paged.storage.device, elem, tuple(paged.region_offsets))
    cached = _REGION_OFFSETS_CACHE.get(key)
    if cached is None:
        if len(_REGION_OFFSETS_CACHE) >= _REGION_OFFSETS_CACHE_SIZE:
            evicted = _REGION_OFFSETS_CACHE.pop(next(iter(_REGION_OFFSETS_CACHE)))
            if evicted.is_cuda:
                # A launch on another stream may not have read it yet; freeing it would let the
                # allocator hand its memory out again. Rare (a new KV cache shape), so just wait.
                torch.cuda.synchronize(evicted.device)
        offsets = [off // elem for off in paged.region_offsets]
        # A blocking upload, once: later launches on any stream see finished bytes.
        cached = torch.tensor(offsets, dtype=torch.int64, device=paged.device)
        _REGION_OFFSETS_CACHE[key] = cached
    return cached


def _block_ids_tensor(block_ids: list[int], device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return torch.tensor(block_ids, dtype=torch.int32)
    # Pinned source: the upload is asynchronous and ordered on the current (launching) stream,
    # and PyTorch's pinned-memory cache keeps the buffer until that copy has run.
    host = torch.tensor(block_ids, dtype=torch.int32, pin_memory=True)
    return host.to(device, non_blocking=True)
