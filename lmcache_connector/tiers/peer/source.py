"""What a peer server reads chunks from, and the rule that keeps torn bytes off the wire.

A :class:`ChunkSource` is one worker rank's view of its own tiers (memory, then disk: :mod:`.store`).
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
* optionally, ``lend(key, block_fps)`` gives the chunk's bytes in place (a memory slot's regions)
  with a ``confirm()`` that says, after the last read of them, whether the slot was rewritten since
  the lookup (:class:`~lmcache_connector.tiers.memory.slots.LentChunk`); ``None`` when it cannot
  (then ``read`` copies). The server hashes and sends lent bytes without a copy and tells the
  client whether they were confirmed (a TORN trailer otherwise: a miss);
* a miss is ``None``, never an exception; an exception is a bug, which the server logs and answers
  as a miss;
* thread-safe, and quick: it holds no lock across the copy that the worker needs to make progress.

:class:`~lmcache_connector.tiers.memory.slots.SlotTable` (the worker keeps one over its memory
pool) keeps the rule for a memory pool of equal slots: the worker calls
:meth:`~SlotTable.overwriting` *before* any write into a slot (a store, a fill), which bumps the
slot's generation and forgets the chunk it held, and :meth:`~SlotTable.holds` once the slot's bytes
are complete; a read copies only when the generation it looked up is still the slot's after the
copy. A disk source needs no table: a chunk file is replaced by rename (an open file keeps its
bytes) and its own checksum is verified as it is read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from lmcache_connector.tiers.memory.slots import ChunkCopy, LentChunk, Shape, SlotTable

__all__ = ["ChunkCopy", "ChunkSource", "LentChunk", "Shape", "SlotTable"]


class ChunkSource(Protocol):
    def read(self, key: bytes, block_fps: tuple[bytes, ...], scratch: Callable[[int], memoryview]) -> ChunkCopy | None:
        """A confirmed copy of the chunk, or ``None`` (absent, other fingerprints, changed during the copy)."""
