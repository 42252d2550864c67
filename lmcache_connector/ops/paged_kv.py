"""vLLM's paged KV cache seen as raw bytes: a few regions of ``num_blocks`` equal rows.

vLLM (0.32+) hands the connector one ``[B, H, N, C]`` view per attention layer, all carved out of
one flat backing allocation. Whatever the layout, a block of one layer is one contiguous *page* of
bytes, and pages of consecutive blocks are ``block_stride`` bytes apart:

* layer-outermost layouts (``LBNHC``, ``LBHNC``): one region per layer, ``block_stride == page``;
* block-outermost, cross-layer layouts (``BLHNC``, ``BLNHC``, ``BHLNC``): every layer's page of a
  block sits in one packed row, so the whole row is copied once as a single region;
* MLA (``H = 1``) is the same thing with a different page size.

Copying a block therefore never needs to know what K, V, heads or tokens are: the connector moves
rows of bytes, which makes every dtype (bf16, fp16, fp32, fp8) and every layout work alike.

A chunk buffer holds ``n`` blocks of every region as a ``[R, n, row_bytes]`` uint8 tensor (rows of
one region contiguous), which is also the byte format chunks are stored in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedKV:
    """Byte-level description of the paged KV cache a connector copies blocks of.

    ``storage`` is the flat uint8 backing buffer; region ``r``'s row for block ``b`` is the
    ``row_bytes`` bytes at ``region_offsets[r] + b * block_stride``.
    """

    storage: torch.Tensor
    region_offsets: list[int]
    block_stride: int
    row_bytes: int
    num_blocks: int

    def __post_init__(self) -> None:
        if self.storage.dtype != torch.uint8 or self.storage.dim() != 1:
            raise ValueError("PagedKV.storage must be a 1-D uint8 tensor")
        last = max(self.region_offsets) + (self.num_blocks - 1) * self.block_stride + self.row_bytes
        if min(self.region_offsets) < 0 or last > self.storage.numel():
            raise ValueError("a region of PagedKV lies outside its storage")
        self.regions = [
            self.storage.as_strided(
                (self.num_blocks, self.row_bytes), (self.block_stride, 1), self.storage.storage_offset() + off
            )
            for off in self.region_offsets
        ]

    @property
    def num_regions(self) -> int:
        return len(self.region_offsets)

    @property
    def device(self) -> torch.device:
        return self.storage.device

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all regions (all layers): the unit that is stored."""
        return self.num_regions * self.row_bytes

    def chunk_shape(self, num_blocks: int) -> tuple[int, int, int]:
        return (self.num_regions, num_blocks, self.row_bytes)

    @classmethod
    def from_layer_views(cls, kv_caches: dict[str, torch.Tensor]) -> PagedKV:
        """Build from the per-layer ``[B, ...]`` views vLLM passes to ``register_kv_caches``.

        Each layer's page of a block is split into its maximal contiguous runs of bytes (one run for
        ``LBNHC``/``LBHNC``/MLA, one per head for ``LHBNC``). Layers that share KV are copied once.
        When the runs of one block tile a single contiguous range (the cross-layer layouts), that
        range is copied as one row. All views must live in one storage and share block count and
        block stride, as vLLM allocates them.
        """
        if not kv_caches:
            raise ValueError("no KV cache tensors were registered")
        first = next(iter(kv_caches.values()))
        storage = first.untyped_storage()
        base = torch.empty(0, dtype=torch.uint8, device=first.device).set_(storage)

        offsets: set[int] = set()
        row_bytes = block_stride = num_blocks = None
        for name, view in kv_caches.items():
            if view.untyped_storage().data_ptr() != storage.data_ptr():
                raise ValueError(f"KV cache of layer {name} is not in the same allocation as the others")
            elem = view.element_size()
            run, starts = _contiguous_runs(view)
            shape = (run * elem, view.stride(0) * elem, view.shape[0])
            if row_bytes is None:
                row_bytes, block_stride, num_blocks = shape
            elif shape != (row_bytes, block_stride, num_blocks):
                raise ValueError(
                    f"KV cache of layer {name} has a different page layout or block count than the "
                    "other layers; hybrid models with mixed layer shapes are not supported"
                )
            offsets.update((view.storage_offset() + s) * elem for s in starts)

        ordered = sorted(offsets)
        packed = ordered[-1] + row_bytes - ordered[0]
        if len(ordered) > 1 and packed == len(ordered) * row_bytes and packed <= block_stride:
            # Block-outermost (cross-layer) layout: one block of every layer is one dense row.
            return cls(base, [ordered[0]], block_stride, packed, num_blocks)
        return cls(base, ordered, block_stride, row_bytes, num_blocks)


def _contiguous_runs(view: torch.Tensor) -> tuple[int, list[int]]:
    """Split one block of ``view`` (``view[b]``) into equal dense runs of elements.

    Returns the run length and the element offset of each run relative to the block's start.
    """
    # Walk the block's dimensions from the smallest stride up (layouts permute them), merging
    # while each dimension continues the dense run of the ones inside it.
    dims = sorted(((st, sz) for sz, st in zip(view.shape[1:], view.stride()[1:], strict=True) if sz > 1), reverse=True)
    run = 1
    while dims and dims[-1][0] == run:
        run *= dims.pop()[1]
    starts = [0]
    for stride, size in dims:
        starts = [s + i * stride for s in starts for i in range(size)]
    return run, starts
