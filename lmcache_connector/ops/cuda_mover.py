"""Moving a chunk's blocks between a paged KV cache on a CUDA device and a (pinned) host slot.

:class:`CudaBlockMover` has the interface of :class:`lmcache_connector.ops.mover.BlockMover`:

* ``store(block_ids, dst, store_id)`` returns at once; ``poll_stores`` reports ``store_id`` once the
  bytes are in ``dst``, and only then may the slot be read, written to disk or reported stored.
* ``load(src, block_ids)`` returns once ``src`` has been read (the slot may be reused or evicted
  right after); every kernel enqueued afterwards on the caller's current stream (the forward)
  sees the loaded blocks. A load is ordered after every store issued before it, so a slot whose
  store has not been reported yet can already be loaded.

How the work is ordered, and why:

* **Store.** The gather kernel runs on the caller's *current* stream, into a device staging
  buffer. That orders it after the forward kernels that wrote this step's KV, and before any later
  kernel that could overwrite the blocks (vLLM may give them to another request once the step
  ends) — so no block needs to be held while the slow part runs. The slow part, the device→host
  copy over PCIe, runs on the mover's own store stream, which waits only for that gather; the
  forward never waits for PCIe. A gather costs the current stream about as long as a device
  ``copy_`` of the chunk (tens of microseconds for a 7B-class 256-token chunk).
* **Staging ring.** Stores rotate through a few device buffers; each remembers the event of its
  last copy to the host, and the current stream waits on that event before a gather reuses the
  buffer. With enough buffers that wait has long finished; when stores outrun PCIe it is the
  back-pressure that keeps a copy still in flight from being overwritten. Buffers are allocated
  on first use (sized to the chunk) and reused, never allocated per store.
* **Load.** The host→device copy runs on a load stream into a staging buffer (its own ring, the
  buffers freed by the scatter that read them); the current stream waits for the copy and runs
  the scatter, so ordering on the current stream makes the blocks safe for the forward. The host
  waits for the copy only, not for other work queued on the current stream.

Slots that are partial chunk views (``stride(0) > n * row``) are copied one region at a time
(each region's rows are contiguous); whole slots in one copy. Host memory should be pinned
(:class:`lmcache_connector.tiers.memory.pool.MemoryPool` pins it on CUDA machines); a pageable slot
still works but every copy then blocks the host.
"""

from __future__ import annotations

import logging

import torch

from lmcache_connector import ops
from lmcache_connector.ops import PagedKV

logger = logging.getLogger("lmcache_connector")

DEFAULT_STORE_BUFFERS = 4
DEFAULT_LOAD_BUFFERS = 2


class _StagingRing:
    """Device byte buffers reused round-robin; each remembers the event after which it is free."""

    def __init__(self, device: torch.device, count: int):
        if count < 1:
            raise ValueError(f"a staging ring needs at least one buffer, got {count}")
        self.device = device
        self.buffers: list[torch.Tensor | None] = [None] * count
        self.free_after: list[torch.cuda.Event | None] = [None] * count
        self._next = 0

    def take(self, nbytes: int) -> tuple[int, torch.Tensor, torch.cuda.Event | None]:
        """Next buffer (at least ``nbytes``), and the event that must complete before writing it."""
        index = self._next
        self._next = (index + 1) % len(self.buffers)
        buffer, event = self.buffers[index], self.free_after[index]
        if buffer is None or buffer.numel() < nbytes:
            if event is not None:
                # Growing (rare: the first larger chunk): the old buffer may still be read by a
                # copy in flight, and dropping it would hand its memory to another allocation.
                event.synchronize()
                event = None
            buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self.buffers[index] = buffer
        return index, buffer, event

    def release(self, index: int, event: torch.cuda.Event) -> None:
        self.free_after[index] = event


class CudaBlockMover:
    """Block copies between a CUDA paged KV cache and host slots: async stores, ordered loads."""

    def __init__(
        self,
        paged: PagedKV,
        store_buffers: int = DEFAULT_STORE_BUFFERS,
        load_buffers: int = DEFAULT_LOAD_BUFFERS,
    ):
        if paged.device.type != "cuda":
            raise ValueError(f"CudaBlockMover needs a KV cache on a CUDA device, got {paged.device}")
        self.paged = paged
        self.device = paged.device
        self._store_stream = torch.cuda.Stream(device=self.device)
        self._load_stream = torch.cuda.Stream(device=self.device)
        self._store_ring = _StagingRing(self.device, store_buffers)
        self._load_ring = _StagingRing(self.device, load_buffers)
        # Stores in issue order; their events are on one stream, so they complete in this order.
        self._pending: list[tuple[int, torch.cuda.Event | None]] = []
        self._warned_pageable = False

    def store(self, block_ids: list[int], dst: torch.Tensor, store_id: int) -> None:
        """Start copying ``block_ids`` into ``dst`` (a ``[R, n, row]`` host slot view)."""
        ops.check_block_ids(self.paged, block_ids, dst)
        if not block_ids:
            self._pending.append((store_id, None))
            return
        self._check_host(dst)
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream()
            index, buffer, busy = self._store_ring.take(dst.numel())
            if busy is not None:
                current.wait_event(busy)
            staged = buffer[: dst.numel()].view(dst.shape)
            ops.gather_blocks(self.paged, block_ids, staged)
            gathered = torch.cuda.Event()
            gathered.record(current)
            self._store_stream.wait_event(gathered)
            with torch.cuda.stream(self._store_stream):
                _copy_regions(dst, staged)
            copied = torch.cuda.Event()
            copied.record(self._store_stream)
        self._store_ring.release(index, copied)
        self._pending.append((store_id, copied))

    def poll_stores(self) -> list[int]:
        """Ids of stores whose bytes are complete since the last call, in the order they were issued."""
        done = 0
        for _, event in self._pending:
            if event is not None and not event.query():
                break
            done += 1
        finished, self._pending = self._pending[:done], self._pending[done:]
        return [store_id for store_id, _ in finished]

    def wait_stores(self) -> list[int]:
        """Block until every started store is complete; return the ids not yet reported."""
        self._store_stream.synchronize()
        finished, self._pending = self._pending, []
        return [store_id for store_id, _ in finished]

    def load(self, src: torch.Tensor, block_ids: list[int]) -> None:
        """Copy ``src`` (``[R, n, row]`` host slot view) into ``block_ids``; see the module docstring."""
        ops.check_block_ids(self.paged, block_ids, src)
        if len(set(block_ids)) != len(block_ids):
            raise ValueError("block ids of one load must be distinct")
        if not block_ids:
            return
        self._check_host(src)
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream()
            index, buffer, busy = self._load_ring.take(src.numel())
            if busy is not None:
                self._load_stream.wait_event(busy)
            # The scheduler may plan a load from a slot whose store is still copying to the host:
            # order the read after every store issued so far (a device-side wait).
            self._load_stream.wait_stream(self._store_stream)
            staged = buffer[: src.numel()].view(src.shape)
            with torch.cuda.stream(self._load_stream):
                _copy_regions(staged, src)
            copied = torch.cuda.Event()
            copied.record(self._load_stream)
            current.wait_event(copied)
            ops.scatter_blocks(staged, self.paged, block_ids)
            scattered = torch.cuda.Event()
            scattered.record(current)
        self._load_ring.release(index, scattered)
        copied.synchronize()

    def _check_host(self, slot: torch.Tensor) -> None:
        if slot.device.type != "cpu":
            raise ValueError(f"slot views must be in host memory, got a tensor on {slot.device}")
        if not self._warned_pageable and not slot.is_pinned():
            self._warned_pageable = True
            logger.warning("Host slots are not pinned: device<->host copies will block and run slower")


def _copy_regions(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for ``[R, n, row]`` tensors, as DMA copies on the current stream.

    A non-contiguous side (a partial chunk inside a slot) is copied region by region: PyTorch
    would otherwise route the whole copy through a temporary pageable buffer, synchronously.
    """
    if dst.is_contiguous() and src.is_contiguous():
        dst.copy_(src, non_blocking=True)
        return
    for dst_region, src_region in zip(dst, src, strict=True):
        dst_region.copy_(src_region, non_blocking=True)
