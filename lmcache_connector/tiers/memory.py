"""The CPU-memory tier's bytes: one pool of equal chunk slots, allocated once.

The pool is ``[num_slots, R, blocks_per_chunk, row_bytes]`` uint8. A slot holds one chunk in the
chunk-buffer format of :mod:`lmcache_connector.ops` (a partial chunk uses the first ``n`` blocks of
its slot), so stores and loads copy straight between the paged KV cache and the slot with no
intermediate buffer and no allocation on the hot path. On a CUDA machine the pool is pinned host
memory, so device<->host copies run at DMA speed and asynchronously; on a CPU-only machine it is
ordinary memory (``pin_memory`` raises there).

Which slot holds which chunk is decided by the scheduler-side index; this class only hands out
views.
"""

from __future__ import annotations

import logging

import torch

from .prefault import Prefaulter

logger = logging.getLogger("lmcache_connector")


class MemoryPool:
    def __init__(self, num_slots: int, chunk_shape: tuple[int, int, int], pin: bool | None = None):
        regions, blocks_per_chunk, row_bytes = chunk_shape
        self.num_slots = num_slots
        self.slot_bytes = regions * blocks_per_chunk * row_bytes
        if pin is None:
            pin = torch.cuda.is_available()
        shape = (num_slots, regions, blocks_per_chunk, row_bytes)
        self.pinned = False
        if pin and num_slots:
            try:
                self.buffer = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
                self.pinned = True
            except RuntimeError as exc:  # no accelerator, or the OS refused to lock the pages
                logger.warning("Pinned host memory unavailable (%s); using pageable memory", exc)
                self.buffer = torch.empty(shape, dtype=torch.uint8)
        else:
            self.buffer = torch.empty(shape, dtype=torch.uint8)
        # Pinned memory is committed at allocation; pageable memory is committed ahead of use.
        self._prefault = None if self.pinned else Prefaulter(self.buffer.view(-1), self.slot_bytes)

    def note_used(self, slot: int) -> None:
        """The scheduler assigned ``slot``: fault in the pages that will be needed next."""
        if self._prefault is not None:
            self._prefault.note_used(slot)

    def slot(self, slot: int, num_blocks: int | None = None, first_block: int = 0) -> torch.Tensor:
        """The ``[R, num_blocks, row_bytes]`` view of blocks ``[first_block, first_block + num_blocks)``."""
        view = self.buffer[slot]
        if num_blocks is None and first_block == 0:
            return view
        end = view.shape[1] if num_blocks is None else first_block + num_blocks
        return view[:, first_block:end]

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.slot_bytes
