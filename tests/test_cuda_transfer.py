"""CudaBlockMover on a real GPU: asynchronous stores into pinned slots, completion reporting, loads,
ordering by slot number, and the staging ring grown by prepare_stores.

Skipped without a CUDA device; benchmarks/gpu_check.py runs the same round trips on the GPU
machine and records them, and tests/test_cuda_mover_ordering.py checks the mover's orderings on
CPU through a fake device.
"""

from __future__ import annotations

import random
import time

import pytest
import torch

from lmcache_connector.ops import PagedKV
from lmcache_connector.ops.reference import gather_blocks_torch
from lmcache_connector.tiers.memory.pool import MemoryPool

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

LAYERS, BLOCKS, PAGE = 4, 64, 16 * 1024  # LBNHC-like: one region of 16 KiB pages per layer
BLOCKS_PER_CHUNK = 8


@pytest.fixture
def paged() -> PagedKV:
    storage = torch.randint(0, 256, (LAYERS * BLOCKS * PAGE,), dtype=torch.uint8, device="cuda")
    return PagedKV(storage, [layer * BLOCKS * PAGE for layer in range(LAYERS)], PAGE, PAGE, BLOCKS)


@pytest.fixture
def pool(paged) -> MemoryPool:
    pool = MemoryPool(6, paged.chunk_shape(BLOCKS_PER_CHUNK))
    pool.buffer.fill_(0xA5)
    return pool


def mover_for(paged, **kwargs):
    from lmcache_connector.ops.cuda_mover import CudaBlockMover

    return CudaBlockMover(paged, **kwargs)


def expected_chunk(paged, ids) -> torch.Tensor:
    out = torch.empty(paged.chunk_shape(len(ids)), dtype=torch.uint8, device="cuda")
    gather_blocks_torch(paged, ids, out)
    return out.cpu()


def poll_until(mover, count: int, timeout_s: float = 10.0) -> list[int]:
    reported: list[int] = []
    deadline = time.monotonic() + timeout_s
    while len(reported) < count and time.monotonic() < deadline:
        reported += mover.poll_stores()
    return reported


def test_make_block_mover_picks_the_cuda_mover_and_pool_is_pinned(paged, pool):
    from lmcache_connector.ops.cuda_mover import CudaBlockMover
    from lmcache_connector.ops.mover import make_block_mover

    assert isinstance(make_block_mover(paged), CudaBlockMover)
    assert pool.pinned and pool.slot(0).is_pinned()


def test_stores_are_reported_in_order_with_the_right_bytes(paged, pool):
    """More stores than staging buffers, one partial chunk; ids reported once each, in order."""
    mover = mover_for(paged, store_buffers=2)
    rng = random.Random(0)
    plans = [(slot, rng.sample(range(BLOCKS), 3 if slot == 2 else BLOCKS_PER_CHUNK)) for slot in range(6)]
    expected = {slot: expected_chunk(paged, ids) for slot, ids in plans}
    for slot, ids in plans:
        mover.store(ids, pool.slot(slot, len(ids)), store_id=10 + slot)
    reported = poll_until(mover, len(plans))
    assert reported == [10 + slot for slot, _ in plans]
    assert mover.poll_stores() == [] and mover.wait_stores() == []
    for slot, ids in plans:
        assert torch.equal(pool.slot(slot, len(ids)), expected[slot]), slot
    assert (pool.slot(2)[:, 3:] == 0xA5).all(), "a partial store wrote past its blocks"


def test_store_keeps_the_bytes_of_blocks_reused_right_after_the_call(paged, pool):
    """vLLM may hand the blocks to another request as soon as the step ends: the stored chunk
    must hold the bytes at store time, not whatever the next forward writes there."""
    mover = mover_for(paged)
    ids = list(range(8, 16))
    expected = expected_chunk(paged, ids)
    mover.store(ids, pool.slot(0), store_id=1)
    for region in paged.regions:  # the next forward, on the current stream
        region[ids] = 0
    assert mover.wait_stores() == [1]
    assert torch.equal(pool.slot(0), expected)


def test_load_fills_blocks_for_the_next_kernel_on_the_current_stream(paged, pool):
    """A whole slot, then blocks 2..6 of a slot (a partial, offset view), into fresh blocks."""
    mover = mover_for(paged, load_buffers=1)
    pool.buffer.random_(0, 256)
    before = paged.storage.clone()
    loads = [(0, 0, 8, list(range(40, 48))), (1, 2, 5, [60, 50, 55, 3, 1])]
    for slot, first, count, ids in loads:
        mover.load(pool.slot(slot, count, first), ids)
        assert torch.equal(expected_chunk(paged, ids), pool.slot(slot)[:, first : first + count])
    untouched = torch.ones_like(before, dtype=torch.bool)
    for *_, ids in loads:
        for offset in paged.region_offsets:
            for block in ids:
                untouched[offset + block * PAGE : offset + (block + 1) * PAGE] = False
    assert torch.equal(paged.storage[untouched], before[untouched])


def test_bad_block_ids_raise_before_anything_moves(paged, pool):
    mover = mover_for(paged)
    before = paged.storage.clone()
    with pytest.raises(IndexError):
        mover.store([0, BLOCKS], pool.slot(0, 2), store_id=1)
    with pytest.raises(IndexError):
        mover.load(pool.slot(0, 2), [-1, 3])
    with pytest.raises(ValueError, match="distinct"):
        mover.load(pool.slot(0, 2), [3, 3])
    assert mover.wait_stores() == []
    assert torch.equal(paged.storage, before)
    assert (pool.buffer == 0xA5).all()


def test_load_from_a_numbered_slot_sees_its_unreported_store(paged, pool):
    """A load waits for the store into its own slot only, and still gets the stored bytes although
    the next forward overwrote the blocks and the store was not reported yet."""
    mover = mover_for(paged)
    ids = list(range(8, 16))
    expected = expected_chunk(paged, ids)
    mover.store(list(range(16, 24)), pool.slot(1), store_id=1, slot=1)
    mover.store(ids, pool.slot(0), store_id=2, slot=0)
    for region in paged.regions:
        region[ids] = 0
    mover.load(pool.slot(0, 5, 2), [40, 41, 42, 43, 44], slot=0)
    assert torch.equal(expected_chunk(paged, [40, 41, 42, 43, 44]), expected[:, 2:7])
    assert mover.wait_stores() == [1, 2]


def test_store_into_a_slot_right_after_a_load_from_it(paged, pool):
    """The scheduler may reuse a slot as soon as a load from it returns."""
    mover = mover_for(paged)
    pool.buffer.random_(0, 256)
    old = pool.slot(3).clone()
    new_ids = list(range(0, 8))
    expected = expected_chunk(paged, new_ids)
    mover.load(pool.slot(3), list(range(48, 56)), slot=3)
    mover.store(new_ids, pool.slot(3), store_id=5, slot=3)
    assert torch.equal(expected_chunk(paged, list(range(48, 56))), old)
    assert mover.wait_stores() == [5]
    assert torch.equal(pool.slot(3), expected)


def test_prepared_stores_get_their_own_staging_buffers(paged, pool):
    """prepare_stores grows the ring for the step (and not past max_staging_bytes); the bytes stay right."""
    mover = mover_for(paged, store_buffers=2, max_staging_bytes=5 * pool.slot_bytes)
    mover.prepare_stores(6, pool.slot_bytes)
    assert mover.store_staging == (5, 5 * pool.slot_bytes)
    shuffled = random.Random(1).sample(range(BLOCKS), 6 * BLOCKS_PER_CHUNK)  # disjoint chunks
    plans = [(slot, shuffled[slot * BLOCKS_PER_CHUNK : (slot + 1) * BLOCKS_PER_CHUNK]) for slot in range(6)]
    expected = {slot: expected_chunk(paged, ids) for slot, ids in plans}
    for slot, ids in plans:
        mover.store(ids, pool.slot(slot), store_id=slot, slot=slot)
        for region in paged.regions:
            region[ids] = 0
    assert mover.wait_stores() == list(range(6))
    for slot, _ in plans:
        assert torch.equal(pool.slot(slot), expected[slot]), slot
