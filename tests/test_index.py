"""The memory tier's bookkeeping: slots, LRU eviction, pins, block-granular lookup (plain integers)."""

from __future__ import annotations

from lmcache_connector.tiers.chain import find_pieces
from lmcache_connector.tiers.memory.index import ChunkIndex, ChunkState


def chunk_fps(prefix: str, n: int) -> tuple[bytes, ...]:
    return tuple(f"{prefix}{i}".encode() for i in range(n))


def lookup(index: ChunkIndex, fps: list[bytes]) -> list[tuple[int, int]]:
    """(chunk number, blocks) of each piece of the longest prefix the memory tier alone holds."""
    return [(p.chunk, p.num_blocks) for p in find_pieces(fps, index.blocks_per_chunk, index)]


def store(index: ChunkIndex, fps: tuple[bytes, ...], ok: bool = True) -> int | None:
    slot = index.prepare_store(fps[-1], fps)
    if slot is not None:
        index.complete_store(fps[-1], ok)
    return slot


def test_lookup_returns_the_longest_stored_prefix_in_whole_blocks():
    index = ChunkIndex(num_slots=4, blocks_per_chunk=4, block_bytes=10)
    prompt = chunk_fps("a", 10)
    store(index, prompt[0:4])
    store(index, prompt[4:8])
    assert lookup(index, list(prompt)) == [(0, 4), (1, 4)]
    # A prompt that diverges inside chunk 1 still reuses the blocks before the divergence.
    diverging = list(prompt[:6]) + [b"x6", b"x7"]
    assert lookup(index, diverging) == [(0, 4), (1, 2)]
    assert lookup(index, [b"other"]) == []


def test_lookup_stops_at_the_first_missing_chunk():
    index = ChunkIndex(num_slots=4, blocks_per_chunk=2, block_bytes=10)
    prompt = chunk_fps("a", 6)
    store(index, prompt[0:2])
    store(index, prompt[4:6])  # chunk 2 without chunk 1 is useless
    assert lookup(index, list(prompt)) == [(0, 2)]


def test_full_chunk_replaces_its_partial_version():
    index = ChunkIndex(num_slots=4, blocks_per_chunk=4, block_bytes=10)
    prompt = chunk_fps("a", 4)
    store(index, prompt[:2])  # the partial last chunk of a shorter prompt
    store(index, prompt)
    assert len(index) == 1 and index.used_slots == 1
    assert index.stored_bytes == 40


def test_least_recently_used_chunk_is_evicted_and_touch_refreshes():
    index = ChunkIndex(num_slots=2, blocks_per_chunk=1, block_bytes=10)
    a, b, c = (b"a",), (b"b",), (b"c",)
    store(index, a)
    store(index, b)
    index.touch(b"a")
    store(index, c)
    assert b"a" in index and b"c" in index and b"b" not in index
    assert index.stats.evictions == 1 and index.used_slots == 2


def test_pinned_and_in_flight_chunks_are_never_evicted():
    index = ChunkIndex(num_slots=2, blocks_per_chunk=1, block_bytes=10)
    store(index, (b"a",))
    index.pin([b"a"])
    assert index.prepare_store(b"b", (b"b",)) is not None  # in flight: STORING and pinned
    assert index.prepare_store(b"c", (b"c",)) is None  # nothing evictable: the store is dropped
    assert index.stats.dropped_stores == 1
    index.unpin([b"a"])
    assert index.prepare_store(b"c", (b"c",)) is not None  # now "a" can go
    assert b"a" not in index


def test_failed_store_frees_its_slot():
    index = ChunkIndex(num_slots=1, blocks_per_chunk=1, block_bytes=10)
    store(index, (b"a",), ok=False)
    assert len(index) == 0 and index.used_slots == 0 and index.stats.failed_stores == 1


def test_in_flight_store_can_be_looked_up_but_a_discarded_one_cannot():
    index = ChunkIndex(num_slots=2, blocks_per_chunk=1, block_bytes=10)
    index.prepare_store(b"a", (b"a",))
    assert index.get(b"a").state is ChunkState.STORING
    assert lookup(index, [b"a"]) == [(0, 1)]
    index.pin([b"a"])
    index.discard(b"a")
    assert lookup(index, [b"a"]) == []
    index.complete_store(b"a", ok=True)
    index.unpin([b"a"])
    assert len(index) == 0 and index.used_slots == 0 and index.pinned == 0


def test_accounting_returns_to_zero_after_clear():
    index = ChunkIndex(num_slots=8, blocks_per_chunk=4, block_bytes=10)
    for i in range(8):
        store(index, chunk_fps(f"p{i}-", 4))
    assert index.used_slots == 8 and index.stored_bytes == 8 * 40
    index.clear()
    assert index.used_slots == 0 and index.stored_bytes == 0 and len(index) == 0
