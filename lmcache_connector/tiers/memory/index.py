"""Bookkeeping of the memory tier: which chunk is in which slot. No tensors here.

The index lives on the scheduler side and is the single authority over the worker's memory pool:
it hands out slots, decides evictions, and knows which chunks may be read. The worker only copies
bytes into and out of the slots it is told to use. The contract (modelled on vLLM's
``kv_offload/abstract.py``):

* ``best_piece(block_fps)`` — the loadable chunk covering the most leading blocks of one chunk's
  worth of a prompt's block fingerprints; side-effect free, so vLLM may ask as often as it likes
  (the prompt-long walk over every tier is :func:`lmcache_connector.tiers.chain.find_pieces`). A
  chunk whose store is still in flight counts: the worker orders the load after the store and
  fails it if the store failed.
* ``prepare_store(key, fps)`` — a free slot (evicting least-recently-used READY, unpinned chunks if
  needed) for a new chunk, which is STORING and pinned until ``complete_store``; ``None`` when every
  slot is pinned: the store is dropped, a future miss, never an error.
* ``complete_store(key, ok)`` — the worker finished (READY) or failed (slot freed).
* ``pin(keys)`` / ``unpin(keys)`` — protect chunks while a load reads them; a pinned chunk is never
  evicted, so a slot is never rewritten under a reader. ``touch(key)`` marks recent use.

A chunk is identified by the fingerprint of its last block; the fingerprints of its other block
boundaries are indexed too, so a prompt that diverges inside a chunk still reuses the blocks before
the divergence. When a chunk is stored that extends a shorter stored chunk of the same prefix (a
partial last chunk grown to full), the shorter one is dropped: it holds nothing the longer lacks.

With ``track_changes()`` (only when vLLM's KV-cache events are on) the index also records, for
``take_changes()``, each chunk that became READY (held) and each READY chunk that stopped being
held: evicted, dropped, discarded or cleared (a pinned one at once, though its slot waits for the
last unpin: it can no longer be found).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass


class ChunkState(enum.Enum):
    STORING = "storing"  # slot handed out, bytes not yet confirmed by every worker
    READY = "ready"  # may be loaded
    DOOMED = "doomed"  # found unusable while pinned; removed when the last pin goes


# A STORING chunk may already be loaded: the worker runs each step's stores before the next step's
# loads (and orders device copies the same way), and fails a load from a slot whose store failed.
_LOADABLE = (ChunkState.READY, ChunkState.STORING)


@dataclass(eq=False)
class ChunkEntry:
    key: bytes
    slot: int
    block_fps: tuple[bytes, ...]
    state: ChunkState = ChunkState.STORING
    pins: int = 0
    filling: bool = False  # an asynchronous fill is still writing the slot: not loadable yet

    @property
    def num_blocks(self) -> int:
        return len(self.block_fps)


@dataclass
class IndexStats:
    evictions: int = 0
    dropped_stores: int = 0
    failed_stores: int = 0


class ChunkIndex:
    def __init__(self, num_slots: int, blocks_per_chunk: int, block_bytes: int):
        self.num_slots = num_slots
        self.blocks_per_chunk = blocks_per_chunk
        self.block_bytes = block_bytes
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._entries: OrderedDict[bytes, ChunkEntry] = OrderedDict()  # least recently used first
        self._by_block: dict[bytes, list[ChunkEntry]] = {}
        self.stats = IndexStats()
        self._stored_blocks = 0
        self._changes: list[tuple[bytes, bool]] | None = None  # (key, held), while tracked

    # ------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def get(self, key: bytes) -> ChunkEntry | None:
        return self._entries.get(key)

    def evictable_slots(self, excluding: set[bytes] = frozenset()) -> int:
        """Slots a new chunk could get now: free ones plus those of unpinned READY chunks (other
        than the ``excluding`` keys, which the caller is about to pin)."""
        return len(self._free_slots) + sum(
            1 for e in self._entries.values() if e.state is ChunkState.READY and e.pins == 0 and e.key not in excluding
        )

    def best_piece(self, block_fps: list[bytes]) -> tuple[ChunkEntry, int] | None:
        """The loadable chunk covering the most leading blocks of ``block_fps`` (one chunk's blocks)."""
        for n in range(len(block_fps), 0, -1):
            for entry in self._by_block.get(block_fps[n - 1], ()):
                if entry.state in _LOADABLE:
                    return entry, n
        return None

    @property
    def used_slots(self) -> int:
        return self.num_slots - len(self._free_slots)

    @property
    def stored_bytes(self) -> int:
        """Bytes of KV held by stored chunks (a partial chunk counts only its blocks)."""
        return self._stored_blocks * self.block_bytes

    def recount_bytes(self) -> int:
        """``stored_bytes`` recomputed from the entries (a consistency check for tests)."""
        return sum(e.num_blocks for e in self._entries.values()) * self.block_bytes

    def entries(self) -> list[ChunkEntry]:
        """Every chunk the tier holds, least recently used first."""
        return list(self._entries.values())

    def pinned_entries(self) -> list[ChunkEntry]:
        return [e for e in self._entries.values() if e.pins]

    @property
    def pinned(self) -> int:
        return sum(e.pins for e in self._entries.values())

    # ------------------------------------------------------------ changes (KV-cache events)

    def track_changes(self) -> None:
        """Record every READY chunk from now on, starting with those held now."""
        if self._changes is None:
            self._changes = [(e.key, True) for e in self._entries.values() if e.state is ChunkState.READY]

    def take_changes(self) -> list[tuple[bytes, bool]]:
        """``(key, held)`` since the last call, in order."""
        if not self._changes:
            return []
        changes, self._changes = self._changes, []
        return changes

    def _unheld(self, entry: ChunkEntry) -> None:
        """``entry`` stops being loadable for good: a READY one was announced as held."""
        if self._changes is not None and entry.state is ChunkState.READY:
            self._changes.append((entry.key, False))

    # ------------------------------------------------------------ stores

    def prepare_store(self, key: bytes, block_fps: tuple[bytes, ...]) -> int | None:
        if key in self._entries or not block_fps or len(block_fps) > self.blocks_per_chunk:
            return None
        if not self._free_slots and not self._evict_one():
            self.stats.dropped_stores += 1
            return None
        entry = ChunkEntry(key, self._free_slots.pop(), tuple(block_fps), pins=1)
        self._entries[key] = entry
        self._stored_blocks += entry.num_blocks
        for fp in entry.block_fps:
            self._by_block.setdefault(fp, []).append(entry)
        return entry.slot

    def complete_store(self, key: bytes, ok: bool) -> None:
        entry = self._entries.get(key)
        if entry is None or entry.state is ChunkState.READY:
            return
        entry.pins -= 1
        entry.filling = False
        if not ok or entry.state is ChunkState.DOOMED:
            self.stats.failed_stores += not ok
            if entry.pins == 0:
                self._remove(entry)
            else:
                entry.state = ChunkState.DOOMED
            return
        entry.state = ChunkState.READY
        if self._changes is not None:
            self._changes.append((key, True))
        self._drop_shorter_versions(entry)

    def _drop_shorter_versions(self, entry: ChunkEntry) -> None:
        for fp in entry.block_fps[:-1]:
            shorter = self._entries.get(fp)
            if shorter is not None and shorter.state is ChunkState.READY and shorter.pins == 0:
                self._remove(shorter)

    # ------------------------------------------------------------ pins and recency

    def pin(self, keys: list[bytes]) -> None:
        for key in keys:
            self._entries[key].pins += 1

    def unpin(self, keys: list[bytes]) -> None:
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None and entry.pins > 0:
                entry.pins -= 1
                if entry.pins == 0 and entry.state is ChunkState.DOOMED:
                    self._remove(entry)

    def touch(self, key: bytes) -> None:
        if key in self._entries:
            self._entries.move_to_end(key)

    def discard(self, key: bytes) -> None:
        """Forget a chunk whose bytes turned out unusable (a failed load); pinned ones wait for unpin."""
        entry = self._entries.get(key)
        if entry is None:
            return
        if entry.pins:
            self._unheld(entry)
            entry.state = ChunkState.DOOMED
        else:
            self._remove(entry)

    def clear(self) -> None:
        """Forget every chunk: unpinned ones now; pinned or in-flight ones can no longer be found
        and are removed when their last pin goes (a reader planned before the clear still reads
        bytes that were valid when it was planned)."""
        for entry in list(self._entries.values()):
            if entry.pins == 0:
                self._remove(entry)
            else:
                self._unheld(entry)
                entry.state = ChunkState.DOOMED

    # ------------------------------------------------------------ eviction

    def _evict_one(self) -> bool:
        for entry in self._entries.values():
            if entry.state is ChunkState.READY and entry.pins == 0:
                self._remove(entry)
                self.stats.evictions += 1
                return True
        return False

    def _remove(self, entry: ChunkEntry) -> None:
        self._unheld(entry)
        del self._entries[entry.key]
        self._stored_blocks -= entry.num_blocks
        for fp in entry.block_fps:
            holders = self._by_block[fp]
            holders.remove(entry)
            if not holders:
                del self._by_block[fp]
        self._free_slots.append(entry.slot)
