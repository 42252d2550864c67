"""What a peer server reads chunks from, and the rule that keeps torn bytes off the wire.

A :class:`ChunkSource` is one worker rank's view of its own tiers (memory, then disk, in phase 2).
The server calls :meth:`ChunkSource.read` from several connection threads at once, for chunks
other instances ask for, while the worker keeps evicting and refilling those same tiers. The
contract:

* ``read(key, block_fps, scratch)`` finds the chunk stored under ``key`` whose block fingerprints
  are exactly ``block_fps`` (anything else is a miss), asks ``scratch(nbytes)`` for a buffer, copies
  the chunk's bytes into it in the chunk-buffer format (``[regions, blocks, row bytes]``), and
  returns a :class:`ChunkCopy` with its shape;
* **copy, then confirm**: the source notes what it read from (a memory slot's generation, a file's
  verified checksum) *before* copying and confirms it is unchanged *after*; if the chunk was
  evicted, replaced or rewritten meanwhile, the answer is ``None`` (a miss for the client), never
  the bytes copied. The server hashes and sends only a confirmed copy, so the checksum a client
  verifies is the checksum of bytes that were the chunk's for the whole copy;
* a miss is ``None``, never an exception; an exception is a bug, which the server logs and answers
  as a miss;
* thread-safe, and quick: it holds no lock across the copy that the worker needs to make progress.

:class:`SlotTable` keeps the rule for a memory pool of equal slots: the worker calls
:meth:`~SlotTable.overwriting` *before* any write into a slot (a store, a fill), which bumps the
slot's generation and forgets the chunk it held, and :meth:`~SlotTable.holds` once the slot's bytes
are complete; a read copies only when the generation it looked up is still the slot's after the
copy. A disk source needs no table: a chunk file is replaced by rename (an open file keeps its
bytes) and its own checksum is verified as it is read.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

Shape = tuple[int, int, int]  # regions, blocks, row bytes


@dataclass(frozen=True)
class ChunkCopy:
    """A confirmed copy of one chunk: ``data`` is the scratch view, holding exactly ``shape``'s bytes."""

    shape: Shape
    data: memoryview


class ChunkSource(Protocol):
    def read(self, key: bytes, block_fps: tuple[bytes, ...], scratch: Callable[[int], memoryview]) -> ChunkCopy | None:
        """A confirmed copy of the chunk, or ``None`` (absent, other fingerprints, changed during the copy)."""


@dataclass(frozen=True)
class _Held:
    slot: int
    generation: int
    block_fps: tuple[bytes, ...]
    shape: Shape


class SlotTable:
    """Which chunk each slot of a memory pool holds, with per-slot generations: a :class:`ChunkSource`.

    ``copy_out(slot, shape, into)`` copies the slot's first ``shape[1]`` blocks into ``into`` (the
    pool's layout is the caller's business); it runs outside the table's lock."""

    def __init__(self, num_slots: int, copy_out: Callable[[int, Shape, memoryview], None]):
        self._generations = [0] * num_slots
        self._by_key: dict[bytes, _Held] = {}
        self._by_slot: dict[int, bytes] = {}
        self._copy_out = copy_out
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
