"""Which chunk each slot of a worker's memory pool holds, with per-slot generations (worker side).

The scheduler's index (:mod:`.index`) decides what goes in which slot; the worker learns of it
step by step and copies the bytes. Something that reads slots outside the worker's own step (a
peer server's threads, :mod:`lmcache_connector.tiers.peer.server`) must never send bytes a slot
held while it was being rewritten. The worker calls :meth:`SlotTable.overwriting` *before* any
write into a slot (a store, a fill; on a device, before the copy is issued), which bumps the slot's
generation and forgets the chunk it held, and :meth:`SlotTable.holds` once the slot's bytes are
complete; :meth:`SlotTable.read` copies a chunk out and confirms afterwards that the slot's
generation did not change (copy, then confirm: :mod:`lmcache_connector.tiers.peer.source`);
:meth:`SlotTable.lend` gives the slot's bytes in place instead, to a reader that confirms the same
way after its last read of them.

Standard library only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Shape = tuple[int, int, int]  # regions, blocks, row bytes


@dataclass(frozen=True)
class ChunkCopy:
    """A confirmed copy of one chunk: ``data`` is the scratch view, holding exactly ``shape``'s bytes."""

    shape: Shape
    data: memoryview


@dataclass(frozen=True)
class LentChunk:
    """One chunk's bytes where the slot holds them (``regions``: ``shape[0]`` views of
    ``shape[1] * shape[2]`` bytes), unconfirmed: they are the chunk's only if ``confirm()``, called
    after the last read of them, says the slot was not rewritten since the chunk was looked up."""

    shape: Shape
    regions: list[memoryview]
    confirm: Callable[[], bool]


@dataclass(frozen=True)
class _Held:
    slot: int
    generation: int
    block_fps: tuple[bytes, ...]
    shape: Shape


class SlotTable:
    """Which chunk each slot of a memory pool holds, with per-slot generations: a :class:`ChunkSource`.

    ``copy_out(slot, shape, into)`` copies the slot's first ``shape[1]`` blocks into ``into`` (the
    pool's layout is the caller's business); it runs outside the table's lock. ``view_out(slot,
    shape)``, where the pool is host memory, gives the same bytes in place, one view per region
    (:meth:`lend`: a peer server sends them without a copy)."""

    def __init__(
        self,
        num_slots: int,
        copy_out: Callable[[int, Shape, memoryview], None],
        view_out: Callable[[int, Shape], list[memoryview]] | None = None,
    ):
        self._generations = [0] * num_slots
        self._by_key: dict[bytes, _Held] = {}
        self._by_slot: dict[int, bytes] = {}
        self._copy_out = copy_out
        self._view_out = view_out
        self._lock = threading.Lock()

    def overwriting(self, slot: int) -> None:
        """The worker is about to write into ``slot``: a read in progress there becomes a miss."""
        with self._lock:
            self._generations[slot] += 1
            key = self._by_slot.pop(slot, None)
            if key is not None:
                del self._by_key[key]

    def holds(self, slot: int, key: bytes, block_fps: Sequence[bytes], shape: Shape) -> None:
        """The slot's bytes are now the complete chunk ``key`` (its store or fill finished on this rank)."""
        with self._lock:
            old = self._by_key.get(key)
            if old is not None and old.slot != slot:
                self._by_slot.pop(old.slot, None)
            previous = self._by_slot.get(slot)
            if previous is not None and previous != key:
                del self._by_key[previous]
            self._by_key[key] = _Held(slot, self._generations[slot], tuple(block_fps), shape)
            self._by_slot[slot] = key

    def forget_all(self) -> None:
        """Every slot is about to be overwritten (a cache reset): nothing is served from them any
        more, and a read in progress becomes a miss."""
        with self._lock:
            for slot in self._by_slot:
                self._generations[slot] += 1
            self._by_key.clear()
            self._by_slot.clear()

    def __contains__(self, key: bytes) -> bool:
        return key in self._by_key

    def read(self, key: bytes, block_fps: tuple[bytes, ...], scratch: Callable[[int], memoryview]) -> ChunkCopy | None:
        with self._lock:
            held = self._by_key.get(key)
        if held is None or held.block_fps != tuple(block_fps):
            return None
        regions, blocks, row = held.shape
        data = scratch(regions * blocks * row)
        self._copy_out(held.slot, held.shape, data)
        with self._lock:
            if self._generations[held.slot] != held.generation:
                return None  # overwritten while we copied: the copy may be torn
        return ChunkCopy(held.shape, data)

    def lend(self, key: bytes, block_fps: tuple[bytes, ...]) -> LentChunk | None:
        """The chunk's bytes in place, to be confirmed after use (:class:`LentChunk`), or ``None``
        (absent, other fingerprints, or no ``view_out``: :meth:`read` copies instead)."""
        if self._view_out is None:
            return None
        with self._lock:
            held = self._by_key.get(key)
        if held is None or held.block_fps != tuple(block_fps):
            return None
        slot, generation = held.slot, held.generation

        def confirm() -> bool:
            with self._lock:
                return self._generations[slot] == generation

        return LentChunk(held.shape, self._view_out(slot, held.shape), confirm)
