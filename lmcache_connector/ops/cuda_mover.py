"""Moving a chunk's blocks between a paged KV cache on a CUDA device and a (pinned) host slot.

:class:`CudaBlockMover` has the interface of :class:`lmcache_connector.ops.mover.BlockMover`:

* ``prepare_stores(count, nbytes)`` — a step hint, called once before a step's stores: make room
  for ``count`` stores of at most ``nbytes`` each (see *Staging ring*).
* ``store(block_ids, dst, store_id, slot=None)`` returns at once; ``poll_stores`` reports
  ``store_id`` once the bytes are in ``dst``, and only then may the slot be read by the host,
  written to disk or reported stored.
* ``load(src, block_ids, slot=None)`` returns once ``src`` has been read (the slot may be reused,
  refilled or evicted right after); every kernel enqueued afterwards on the caller's current
  stream (the forward) sees the loaded blocks. A slot whose store has not been reported yet can
  already be loaded: the load is ordered after that store on the device.

``slot`` is the number of the memory-pool slot the view belongs to (the same number for a whole
slot and for any part of it). With it, the mover orders by slot: a load waits only for the last
store into its slot, and a store into a slot waits for the last load that read it. Without it
(``slot=None``) it assumes the worst: a load waits for every store issued before it, a store for
every load. Both kinds may be mixed; an unnumbered store or load counts for every slot.

How the work is ordered, and why:

* **Store.** The gather kernel runs on the caller's *current* stream, into a device staging
  buffer. That orders it after the forward kernels that wrote this step's KV, and before any later
  kernel that could overwrite the blocks (vLLM may give them to another request once the step
  ends) — so no block needs to be held while the slow part runs. The slow part, the device→host
  copy over PCIe, runs on the mover's own store stream, which waits only for that gather and for
  the last load from the same slot; the forward never waits for PCIe while the staging ring has
  room. A gather costs the current stream about as long as a device ``copy_`` of the chunk (tens
  of microseconds for a 7B-class 256-token chunk of 32 MiB); its copy to the host, at PCIe speed,
  tens of times more.
* **Staging ring.** Stores take device buffers oldest-first; each remembers the event of its last
  copy to the host, and the current stream waits on that event before a gather reuses the buffer.
  Copies to the host finish in the order they were issued (one stream), so the oldest buffer is
  the first to be free. When stores outrun PCIe that wait is the back-pressure that keeps a copy
  still in flight from being overwritten — and it stalls the forward by one copy per store. So
  ``prepare_stores(count, nbytes)`` grows the ring before the step, to ``count`` free buffers
  plus those still busy from earlier steps, bounded by ``max_staging_bytes`` of device memory
  (default 512 MiB: 16 chunks of a 7B-class model, an eighth of a 32k-token prompt; past it the
  back-pressure applies as without the hint). The ring starts at ``store_buffers`` and never
  shrinks; its buffers are allocated by ``prepare_stores`` (without it, on first use) and reused,
  never allocated per store. This memory is outside what vLLM's profiler budgeted for its KV
  cache.
* **Load.** The host→device copy runs on a load stream into a staging buffer (its own ring, the
  buffers freed by the scatter that read them), after the last store into the slot (or every
  store, without a slot number); the current stream waits for the copy and runs the scatter, so
  ordering on the current stream makes the blocks safe for the forward. The host waits for the
  copy only, not for other work queued on the current stream. A store into the slot is ordered
  after that copy explicitly (the host wait and the current stream already order it today; the
  explicit wait keeps it so for a store issued from another stream).

Slots that are partial chunk views (``stride(0) > n * row``) are copied one region at a time
(each region's rows are contiguous); whole slots in one copy. Host memory should be pinned
(:class:`lmcache_connector.tiers.memory.pool.MemoryPool` pins it on CUDA machines); a pageable slot
still works but every copy then blocks the host.

Every stream, event, allocation and copy goes through a small device API (:class:`TorchCuda` by
default); the unit tests pass a fake one whose streams run their work only when the host waits,
and check every ordering above on CPU.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from lmcache_connector import ops
from lmcache_connector.ops import PagedKV

logger = logging.getLogger("lmcache_connector")

DEFAULT_STORE_BUFFERS = 4
DEFAULT_LOAD_BUFFERS = 2
DEFAULT_MAX_STAGING_BYTES = 512 * 2**20


class TorchCuda:
    """The mover's device API on one CUDA device: streams, events, allocation and the copies.

    A stream has ``wait_event``, ``wait_stream`` and ``synchronize``; an event ``record(stream)``,
    ``query`` and ``synchronize``. The copies run on the current stream.
    """

    def __init__(self, device: torch.device):
        self.device = device

    def on_device(self):
        return torch.cuda.device(self.device)

    def new_stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(device=self.device)

    def new_event(self) -> torch.cuda.Event:
        return torch.cuda.Event()

    def current_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def on_stream(self, stream: torch.cuda.Stream):
        return torch.cuda.stream(stream)

    def empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def gather(self, paged: PagedKV, block_ids: list[int], out: torch.Tensor) -> None:
        ops.gather_blocks(paged, block_ids, out)

    def scatter(self, chunk: torch.Tensor, paged: PagedKV, block_ids: list[int]) -> None:
        ops.scatter_blocks(chunk, paged, block_ids)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        _copy_regions(dst, src)


class _StagingRing:
    """Device byte buffers taken oldest-first; each remembers the event after which it is free."""

    def __init__(self, device_api: Any, count: int):
        if count < 1:
            raise ValueError(f"a staging ring needs at least one buffer, got {count}")
        self._api = device_api
        self.buffers: list[torch.Tensor | None] = [None] * count
        self.free_after: list[Any] = [None] * count
        self._next = 0

    def __len__(self) -> int:
        return len(self.buffers)

    @property
    def nbytes(self) -> int:
        return sum(buffer.numel() for buffer in self.buffers if buffer is not None)

    def take(self, nbytes: int) -> tuple[int, torch.Tensor, Any]:
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
            buffer = self._api.empty(nbytes)
            self.buffers[index] = buffer
        return index, buffer, event

    def release(self, index: int, event: Any) -> None:
        self.free_after[index] = event

    def busy(self) -> int:
        """How many buffers a copy may still be using.

        Buffers are released in the order their events are recorded on one stream, so they become
        free in take order: the free ones come first, and the count stops at the first busy one.
        """
        count = len(self.buffers)
        for k in range(count):
            event = self.free_after[(self._next + k) % count]
            if event is not None and not event.query():
                return count - k
        return 0

    def grow(self, count: int, nbytes: int) -> None:
        """Give every free buffer at least ``nbytes``, and add free ones (taken next) up to ``count``."""
        free = len(self.buffers) - self.busy()
        for k in range(free):
            index = (self._next + k) % len(self.buffers)
            buffer = self.buffers[index]
            if buffer is None or buffer.numel() < nbytes:
                # Free: no copy reads the old buffer any more, so it can go.
                self.buffers[index], self.free_after[index] = self._api.empty(nbytes), None
        added = count - len(self.buffers)
        if added > 0:
            self.buffers[self._next : self._next] = [self._api.empty(nbytes) for _ in range(added)]
            self.free_after[self._next : self._next] = [None] * added


class CudaBlockMover:
    """Block copies between a CUDA paged KV cache and host slots: async stores, ordered loads."""

    def __init__(
        self,
        paged: PagedKV,
        store_buffers: int = DEFAULT_STORE_BUFFERS,
        load_buffers: int = DEFAULT_LOAD_BUFFERS,
        max_staging_bytes: int = DEFAULT_MAX_STAGING_BYTES,
        device_api: Any = None,
    ):
        if device_api is None:
            if paged.device.type != "cuda":
                raise ValueError(f"CudaBlockMover needs a KV cache on a CUDA device, got {paged.device}")
            device_api = TorchCuda(paged.device)
        if max_staging_bytes < 0:
            raise ValueError(f"max_staging_bytes must be >= 0, got {max_staging_bytes}")
        self.paged = paged
        self.max_staging_bytes = max_staging_bytes
        self._api = device_api
        self._min_store_buffers = store_buffers
        self._store_stream = device_api.new_stream()
        self._load_stream = device_api.new_stream()
        self._store_ring = _StagingRing(device_api, store_buffers)
        self._load_ring = _StagingRing(device_api, load_buffers)
        # Stores in issue order; their events are on one stream, so they complete in this order.
        self._pending: list[tuple[int, Any, int | None]] = []
        # What the other stream has not waited for yet: the last store into each slot (until it is
        # reported) and the last load from each slot; None keys the unnumbered ones.
        self._stores_into: dict[int | None, Any] = {}
        self._loads_from: dict[int | None, Any] = {}
        self._warned_pageable = False

    @property
    def store_staging(self) -> tuple[int, int]:
        """(buffers, bytes) of the store staging ring."""
        return len(self._store_ring), self._store_ring.nbytes

    def prepare_stores(self, count: int, nbytes: int) -> None:
        """Step hint, before a step's ``count`` stores of at most ``nbytes`` each (a full chunk's slot
        bytes): grow the staging ring so none of them waits for a copy to the host, up to
        ``max_staging_bytes`` of device memory."""
        if count <= 0 or nbytes <= 0:
            return
        limit = max(self._min_store_buffers, self.max_staging_bytes // nbytes)
        with self._api.on_device():
            self._store_ring.grow(min(count + self._store_ring.busy(), limit), nbytes)

    def store(self, block_ids: list[int], dst: torch.Tensor, store_id: int, slot: int | None = None) -> None:
        """Start copying ``block_ids`` into ``dst`` (a ``[R, n, row]`` view of pool slot ``slot``)."""
        ops.check_block_ids(self.paged, block_ids, dst)
        if not block_ids:
            self._pending.append((store_id, None, slot))
            return
        self._check_host(dst)
        api, store_stream = self._api, self._store_stream
        with api.on_device():
            current = api.current_stream()
            index, buffer, busy = self._store_ring.take(dst.numel())
            if busy is not None:
                current.wait_event(busy)  # back-pressure: that buffer's copy to the host is not done
            staged = buffer[: dst.numel()].view(dst.shape)
            api.gather(self.paged, block_ids, staged)
            gathered = api.new_event()
            gathered.record(current)
            store_stream.wait_event(gathered)
            # Not over bytes a load is still reading. Once the store stream has waited for a load,
            # every later store is ordered after it too: forget it.
            if slot is None:
                store_stream.wait_stream(self._load_stream)
                self._loads_from.clear()
            else:
                for key in (slot, None):
                    loaded = self._loads_from.pop(key, None)
                    if loaded is not None:
                        store_stream.wait_event(loaded)
            with api.on_stream(store_stream):
                api.copy(dst, staged)
            copied = api.new_event()
            copied.record(store_stream)
        self._store_ring.release(index, copied)
        self._pending.append((store_id, copied, slot))
        self._stores_into[slot] = copied

    def poll_stores(self) -> list[int]:
        """Ids of stores whose bytes are complete since the last call, in the order they were issued."""
        done = 0
        for _, event, _ in self._pending:
            if event is not None and not event.query():
                break
            done += 1
        finished, self._pending = self._pending[:done], self._pending[done:]
        for _, event, slot in finished:
            if event is not None and self._stores_into.get(slot) is event:
                del self._stores_into[slot]
        return [store_id for store_id, _, _ in finished]

    def wait_stores(self) -> list[int]:
        """Block until every started store is complete; return the ids not yet reported."""
        self._store_stream.synchronize()
        finished, self._pending = self._pending, []
        self._stores_into.clear()
        return [store_id for store_id, _, _ in finished]

    def load(self, src: torch.Tensor, block_ids: list[int], slot: int | None = None) -> None:
        """Copy ``src`` (``[R, n, row]`` view of pool slot ``slot``) into ``block_ids``; see the module docstring."""
        ops.check_block_ids(self.paged, block_ids, src)
        if len(set(block_ids)) != len(block_ids):
            raise ValueError("block ids of one load must be distinct")
        if not block_ids:
            return
        self._check_host(src)
        api, load_stream = self._api, self._load_stream
        with api.on_device():
            current = api.current_stream()
            index, buffer, busy = self._load_ring.take(src.numel())
            if busy is not None:
                load_stream.wait_event(busy)
            # The scheduler may plan a load from a slot whose store is still copying to the host:
            # order the read after that store (a device-side wait), or after every store without a
            # slot number. As for stores, a store waited for once needs no second wait.
            if slot is None:
                load_stream.wait_stream(self._store_stream)
                self._stores_into.clear()
            else:
                for key in (slot, None):
                    stored = self._stores_into.pop(key, None)
                    if stored is not None:
                        load_stream.wait_event(stored)
            staged = buffer[: src.numel()].view(src.shape)
            with api.on_stream(load_stream):
                api.copy(staged, src)
            copied = api.new_event()
            copied.record(load_stream)
            current.wait_event(copied)
            api.scatter(staged, self.paged, block_ids)
            scattered = api.new_event()
            scattered.record(current)
        self._load_ring.release(index, scattered)
        self._loads_from[slot] = copied
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
