"""CudaBlockMover's ordering on CPU: which copy waits for which, through a fake device.

The fake device queues every copy on its stream and runs nothing until the host waits (an event's
or a stream's ``synchronize``); then it runs only what that wait depends on, compute-stream work
first whenever it may run — the way gathers race ahead of PCIe on a real GPU. So a missing
device-side wait shows as wrong bytes, and an extra one as a copy that ran although nothing asked
for it. The same mover runs on a real GPU in tests/test_cuda_transfer.py.
"""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

from lmcache_connector import ops
from lmcache_connector.ops import PagedKV
from lmcache_connector.ops.cuda_mover import CudaBlockMover
from lmcache_connector.ops.mover import BlockMover

LAYERS, BLOCKS, PAGE = 2, 48, 64
BLOCKS_PER_CHUNK = 4
SLOTS = 8


class Op:
    """One piece of queued device work: a copy (``fn``) or a wait for another stream's op."""

    def __init__(self, stream: FakeStream, label: str, deps: list[Op], fn=None, reads=None, writes=None):
        self.stream, self.label, self.deps, self.fn = stream, label, deps, fn
        self.reads, self.writes = _byte_range(reads), _byte_range(writes)
        self.waited = deps[-1] if label == "wait" and deps else None
        self.waited_was_pending = self.waited is not None and not self.waited.done
        self.done = False


def _byte_range(tensor: torch.Tensor | None) -> tuple[int, int] | None:
    if tensor is None:
        return None
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
    return tensor.data_ptr(), tensor.data_ptr() + last + 1


class FakeStream:
    def __init__(self, device: FakeDevice, name: str):
        self.device, self.name, self.last = device, name, None

    def enqueue(self, label: str, waits: tuple[Op | None, ...] = (), fn=None, reads=None, writes=None) -> Op:
        deps = [op for op in (self.last, *waits) if op is not None]
        op = Op(self, label, deps, fn, reads, writes)
        self.last = op
        self.device.ops.append(op)
        return op

    def wait_event(self, event: FakeEvent) -> None:
        self.enqueue("wait", waits=(event.op,))

    def wait_stream(self, other: FakeStream) -> None:
        self.enqueue("wait", waits=(other.last,))

    def synchronize(self) -> None:
        self.device.run(self.last)


class FakeEvent:
    def __init__(self, device: FakeDevice):
        self.device, self.op = device, None

    def record(self, stream: FakeStream) -> None:
        self.op = stream.last

    def query(self) -> bool:
        return self.op is None or self.op.done

    def synchronize(self) -> None:
        self.device.run(self.op)


class FakeDevice:
    """The mover's device API (see ``TorchCuda``) over CPU tensors, with deferred execution."""

    def __init__(self):
        self.ops: list[Op] = []
        self.compute = FakeStream(self, "compute")
        self.current = self.compute
        self.allocations = 0
        self._streams = 0

    # -- the device API
    def on_device(self):
        return contextlib.nullcontext()

    def new_stream(self) -> FakeStream:
        self._streams += 1
        return FakeStream(self, f"mover stream {self._streams}")

    def new_event(self) -> FakeEvent:
        return FakeEvent(self)

    def current_stream(self) -> FakeStream:
        return self.current

    @contextlib.contextmanager
    def on_stream(self, stream: FakeStream):
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous

    def empty(self, nbytes: int) -> torch.Tensor:
        self.allocations += 1
        return torch.empty(nbytes, dtype=torch.uint8)

    def gather(self, paged: PagedKV, block_ids: list[int], out: torch.Tensor) -> None:
        ids = list(block_ids)
        self.current.enqueue("gather", fn=lambda: ops.gather_blocks(paged, ids, out), writes=out)

    def scatter(self, chunk: torch.Tensor, paged: PagedKV, block_ids: list[int]) -> None:
        ids = list(block_ids)
        self.current.enqueue("scatter", fn=lambda: ops.scatter_blocks(chunk, paged, ids), reads=chunk)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.current.enqueue("copy", fn=lambda: dst.copy_(src), reads=src, writes=dst)

    # -- running the queued work
    def run(self, target: Op | None) -> None:
        """Run ``target`` and everything it depends on, compute-stream work first."""
        if target is None or target.done:
            return
        needed = closure(target)
        while not target.done:
            ready = [op for op in self.ops if op in needed and not op.done and all(d.done for d in op.deps)]
            op = min(ready, key=lambda op: op.stream is not self.compute)  # min() keeps issue order on ties
            if op.fn is not None:
                op.fn()
            op.done = True

    def run_all(self) -> None:
        for op in list(self.ops):
            self.run(op)

    def forward(self, fn) -> None:
        """Work of the next forward pass on the compute stream (it may overwrite stored blocks)."""
        self.compute.enqueue("forward", fn=fn)


def closure(op: Op) -> set[Op]:
    """``op`` and every op it waits for, directly or through others."""
    seen, todo = set(), [op]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(current.deps)
    return seen


def depends_on(later: Op, earlier: Op) -> bool:
    return earlier in closure(later)


def overlaps(a: tuple[int, int] | None, b: tuple[int, int]) -> bool:
    return a is not None and a[0] < b[1] and b[0] < a[1]


# ---------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture
def paged() -> PagedKV:
    storage = torch.randint(0, 256, (LAYERS * BLOCKS * PAGE,), dtype=torch.uint8)
    return PagedKV(storage, [layer * BLOCKS * PAGE for layer in range(LAYERS)], PAGE, PAGE, BLOCKS)


@pytest.fixture
def pool(paged) -> torch.Tensor:
    return torch.full((SLOTS, *paged.chunk_shape(BLOCKS_PER_CHUNK)), 0xA5, dtype=torch.uint8)


@pytest.fixture
def device() -> FakeDevice:
    return FakeDevice()


def blocks_of(paged: PagedKV, ids: list[int]) -> torch.Tensor:
    out = torch.empty(paged.chunk_shape(len(ids)), dtype=torch.uint8)
    ops.gather_blocks(paged, ids, out)
    return out


def slot_range(pool: torch.Tensor, slot: int) -> tuple[int, int]:
    return _byte_range(pool[slot])


def copy_into(device: FakeDevice, pool: torch.Tensor, slot: int) -> Op:
    """The last device->host copy into ``slot``."""
    return [op for op in device.ops if op.label == "copy" and overlaps(op.writes, slot_range(pool, slot))][-1]


def copy_from(device: FakeDevice, pool: torch.Tensor, slot: int) -> Op:
    """The last host->device copy reading ``slot``."""
    return [op for op in device.ops if op.label == "copy" and overlaps(op.reads, slot_range(pool, slot))][-1]


def ring_waits(device: FakeDevice, since: int) -> list[Op]:
    """Waits the compute stream was given since op number ``since`` on copies still in flight."""
    return [
        op
        for op in device.ops[since:]
        if op.stream is device.compute and op.label == "wait" and op.waited_was_pending and op.waited.label == "copy"
    ]


def chunk_ids(chunk: int) -> list[int]:
    return list(range(chunk * BLOCKS_PER_CHUNK, (chunk + 1) * BLOCKS_PER_CHUNK))


# ---------------------------------------------------------------------------- loads vs stores


def test_load_from_a_slot_does_not_wait_for_a_store_into_another_slot(paged, pool, device):
    mover = CudaBlockMover(paged, device_api=device)
    expected_a = blocks_of(paged, chunk_ids(0))
    mover.store(chunk_ids(0), pool[0], store_id=1, slot=0)
    mover.store(chunk_ids(1), pool[1], store_id=2, slot=1)
    mover.load(pool[0], chunk_ids(5), slot=0)

    load_a, store_a, store_b = copy_from(device, pool, 0), copy_into(device, pool, 0), copy_into(device, pool, 1)
    assert load_a.done and depends_on(load_a, store_a)
    assert not depends_on(load_a, store_b)
    assert not store_b.done, "the load ran the copy into another slot"
    assert mover.poll_stores() == [1], "only the store the load needed is complete"
    device.run_all()
    assert mover.poll_stores() == [2]
    assert torch.equal(blocks_of(paged, chunk_ids(5)), expected_a)


def test_load_waits_for_the_store_into_its_slot_before_it_is_reported(paged, pool, device):
    """The scheduler may load a slot whose store is still copying; the next forward may then
    overwrite the stored blocks: the load must still see the bytes the store gathered."""
    mover = CudaBlockMover(paged, device_api=device)
    ids = chunk_ids(2)
    expected = blocks_of(paged, ids)
    mover.store(ids, pool[3], store_id=7, slot=3)
    device.forward(lambda: [region.index_fill_(0, torch.tensor(ids), 0) for region in paged.regions])
    mover.load(pool[3, :, 1:3], [40, 41], slot=3)  # a partial view of the same slot
    device.run_all()
    assert torch.equal(pool[3], expected)
    assert torch.equal(blocks_of(paged, [40, 41]), expected[:, 1:3])
    assert mover.poll_stores() == [7]


def test_load_without_a_slot_waits_for_every_store(paged, pool, device):
    mover = CudaBlockMover(paged, device_api=device)
    mover.store(chunk_ids(0), pool[0], store_id=1, slot=0)
    mover.store(chunk_ids(1), pool[1], store_id=2, slot=1)
    mover.store(chunk_ids(2), pool[2], store_id=3)  # no slot number
    mover.load(pool[0], chunk_ids(5))
    assert all(copy_into(device, pool, slot).done for slot in range(3))
    assert mover.poll_stores() == [1, 2, 3]


def test_load_with_a_slot_waits_for_a_store_without_one(paged, pool, device):
    """A store with no slot number may have gone into any slot."""
    mover = CudaBlockMover(paged, device_api=device)
    mover.store(chunk_ids(1), pool[1], store_id=1)
    mover.store(chunk_ids(2), pool[2], store_id=2, slot=2)
    mover.load(pool[0], chunk_ids(5), slot=0)
    assert depends_on(copy_from(device, pool, 0), copy_into(device, pool, 1))
    assert not copy_into(device, pool, 2).done


def test_stores_are_still_reported_in_issue_order_once_complete(paged, pool, device):
    mover = CudaBlockMover(paged, device_api=device, store_buffers=2)
    for slot in range(5):
        mover.store(chunk_ids(slot), pool[slot], store_id=10 + slot, slot=slot)
    assert mover.poll_stores() == []
    mover.load(pool[1], chunk_ids(8), slot=1)
    assert mover.poll_stores() == [10, 11]
    assert mover.wait_stores() == [12, 13, 14]
    assert mover.poll_stores() == [] and mover.wait_stores() == []


# ---------------------------------------------------------------------------- stores vs loads


def test_store_into_a_slot_waits_for_the_last_load_reading_it(paged, pool, device):
    """The scheduler may reuse a slot right after a load; here the store is issued from another
    stream than the load, so only the mover's own wait orders it after the load's read."""
    mover = CudaBlockMover(paged, device_api=device)
    pool.random_(0, 256)
    mover.load(pool[0], chunk_ids(5), slot=0)
    load_a = copy_from(device, pool, 0)
    side = device.new_stream()
    with device.on_stream(side):
        mover.store(chunk_ids(1), pool[1], store_id=1, slot=1)
        mover.store(chunk_ids(2), pool[0], store_id=2, slot=0)
    assert depends_on(copy_into(device, pool, 0), load_a)
    assert not depends_on(copy_into(device, pool, 1), load_a)


def test_store_without_a_slot_waits_for_every_load(paged, pool, device):
    mover = CudaBlockMover(paged, device_api=device)
    mover.load(pool[0], chunk_ids(5), slot=0)
    mover.load(pool[1], chunk_ids(6), slot=1)
    side = device.new_stream()
    with device.on_stream(side):
        mover.store(chunk_ids(2), pool[2], store_id=1)
    store = copy_into(device, pool, 2)
    assert depends_on(store, copy_from(device, pool, 0)) and depends_on(store, copy_from(device, pool, 1))


def test_store_with_a_slot_waits_for_a_load_without_one(paged, pool, device):
    """A load with no slot number may have read any slot."""
    mover = CudaBlockMover(paged, device_api=device)
    mover.load(pool[0], chunk_ids(5))
    side = device.new_stream()
    with device.on_stream(side):
        mover.store(chunk_ids(2), pool[0], store_id=1, slot=0)
    assert depends_on(copy_into(device, pool, 0), copy_from(device, pool, 0))


# ---------------------------------------------------------------------------- the staging ring


def test_prepared_step_never_waits_on_a_staging_buffer(paged, pool, device):
    """prepare_stores(count) before a step: none of its stores waits for PCIe, though no copy to
    the host has finished (also those of the step before), and no store allocates."""
    slot_bytes = pool[0].numel()
    mover = CudaBlockMover(paged, device_api=device, store_buffers=2)
    for step in range(2):  # nothing runs in between: the first step's copies are all still in flight
        mover.prepare_stores(4, slot_bytes)
        allocations, since = device.allocations, len(device.ops)
        for k in range(4):
            slot = 4 * step + k
            mover.store(chunk_ids(slot), pool[slot], store_id=slot, slot=slot)
        assert ring_waits(device, since) == [], f"step {step} waited on a staging buffer"
        assert device.allocations == allocations, "a store allocated a staging buffer"
    assert mover.store_staging == (8, 8 * slot_bytes)
    expected = torch.stack([blocks_of(paged, chunk_ids(slot)) for slot in range(8)])
    assert mover.wait_stores() == list(range(8))
    assert torch.equal(pool, expected)

    # Once the copies are done the buffers are free again: the next step reuses them.
    allocations = device.allocations
    mover.prepare_stores(4, slot_bytes)
    assert device.allocations == allocations and mover.store_staging[0] == 8


def test_unprepared_stores_wait_for_the_buffer_they_reuse(paged, pool, device):
    """Without the hint the ring keeps its size: a store reusing a buffer whose copy is still in
    flight waits for it (back-pressure), and every slot still gets its own bytes although the
    fake device runs gathers as early as it may."""
    mover = CudaBlockMover(paged, device_api=device, store_buffers=2)
    since = len(device.ops)
    for slot in range(6):
        mover.store(chunk_ids(slot), pool[slot], store_id=slot, slot=slot)
    assert len(ring_waits(device, since)) == 4
    assert mover.store_staging[0] == 2
    assert mover.wait_stores() == list(range(6))
    assert torch.equal(pool[:6], torch.stack([blocks_of(paged, chunk_ids(slot)) for slot in range(6)]))


def test_staging_ring_stops_growing_at_its_byte_cap(paged, pool, device):
    slot_bytes = pool[0].numel()
    mover = CudaBlockMover(paged, device_api=device, store_buffers=2, max_staging_bytes=3 * slot_bytes)
    mover.prepare_stores(6, slot_bytes)
    assert mover.store_staging == (3, 3 * slot_bytes)
    since = len(device.ops)
    for slot in range(6):
        mover.store(chunk_ids(slot), pool[slot], store_id=slot, slot=slot)
    assert len(ring_waits(device, since)) == 3, "stores beyond the cap wait for a buffer, as without the hint"
    assert mover.wait_stores() == list(range(6))
    assert torch.equal(pool[:6], torch.stack([blocks_of(paged, chunk_ids(slot)) for slot in range(6)]))


def test_prepare_grows_buffers_of_a_smaller_chunk_and_keeps_partial_stores_right(paged, pool, device):
    """A partial chunk first (small buffers allocated on first use), then the hint for full ones."""
    mover = CudaBlockMover(paged, device_api=device, store_buffers=2)
    mover.store([7, 3], pool[0, :, :2], store_id=1, slot=0)
    mover.wait_stores()
    mover.prepare_stores(3, pool[0].numel())
    assert mover.store_staging == (3, 3 * pool[0].numel())
    allocations = device.allocations
    rng = random.Random(0)
    plans = [(slot, rng.sample(range(BLOCKS), 3 if slot == 2 else BLOCKS_PER_CHUNK)) for slot in (1, 2, 3)]
    for slot, ids in plans:
        mover.store(ids, pool[slot, :, : len(ids)], store_id=slot, slot=slot)
    assert device.allocations == allocations
    assert mover.wait_stores() == [1, 2, 3]
    assert torch.equal(pool[0, :, :2], blocks_of(paged, [7, 3]))
    for slot, ids in plans:
        assert torch.equal(pool[slot, :, : len(ids)], blocks_of(paged, ids))
    assert (pool[2, :, 3:] == 0xA5).all(), "a partial store wrote past its blocks"


def test_cuda_mover_refuses_a_cpu_cache_without_a_device_api(paged):
    with pytest.raises(ValueError, match="CUDA device"):
        CudaBlockMover(paged)


def test_cpu_mover_takes_the_same_calls(paged, pool):
    mover = BlockMover(paged)
    mover.prepare_stores(2, pool[0].numel())
    mover.store(chunk_ids(0), pool[0], store_id=1, slot=0)
    mover.load(pool[0], chunk_ids(3), slot=0)
    assert mover.poll_stores() == [1]
    assert torch.equal(blocks_of(paged, chunk_ids(3)), blocks_of(paged, chunk_ids(0)))
