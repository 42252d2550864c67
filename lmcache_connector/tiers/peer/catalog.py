"""The scheduler side of the peer tier: what other instances hold, and what this one tells them.

:class:`PeerCatalog` is the tier contract's catalog (:mod:`lmcache_connector.tiers.base`) over two
background pieces of phase 1:

* a :class:`~.view.PeerView` answers ``best_piece`` from its local view of the registry (PENDING
  while a question is in flight: vLLM asks again later), never naming this instance. A hit is a
  chunk with the live holders the registry named (``StoredChunk.sources``), which the plan's fill
  carries to the workers: every rank fetches the chunk's shard from the same rank of a holder
  (:mod:`.store`). Fills are asynchronous (network), and vLLM counts these hits as ``p2p``;
* a :class:`~.publisher.RegistryPublisher` keeps this instance's entries true. The planner hands the
  catalog every chunk the memory tier and the disk tier start or stop holding
  (``holdings_changed``: a chunk counts as held once every rank has it, a memory store or fill all
  ranks reported, or a disk write all ranks finished); a chunk is published when the first of them
  holds it and withdrawn when neither does. A reset withdraws everything; ``close`` leaves the
  registry at once.

The tier is never written behind a memory slot (``accepts_writes`` is False): peers' bytes are
their own. A chunk a fill found missing or bad at every holder is forgotten until asked again. A
holder a worker started skipping (it failed: garbage, silence, a dead connection) is left out of
every answer for as long as that worker skips it (``skip_source``, 1 s doubling up to 60 s), so no
request waits for a fill that would fail at once; a chunk only skipped holders hold is a miss.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from lmcache_connector.tiers.base import PENDING, Catalog, HeldChange, StoredChunk, _Pending
from lmcache_connector.tiers.peer.publisher import RegistryPublisher
from lmcache_connector.tiers.peer.view import PeerView

# The phase-1 pieces' counters that the connector exports (lmcache_connector.counters); the
# publisher's own (chunks published, withdrawn) are bookkeeping, not exported.
_COUNTS = {"registry_failures": "remote_failures"}


class PeerCatalog(Catalog):
    name = "peer"
    hit_source = "p2p"
    asynchronous = True
    order = 20
    learns_by_asking = True
    watches_holdings = True

    def __init__(self, view: PeerView, publisher: RegistryPublisher):
        self.view = view
        self.publisher = publisher
        self._holding: dict[bytes, set[str]] = {}  # chunk -> this instance's tiers that hold it
        self._skipped: dict[str, float] = {}  # holder (as a source) -> when the workers try it again

    def poll(self) -> None:
        self.view.poll()
        if self._skipped:
            now = time.monotonic()
            self._skipped = {source: until for source, until in self._skipped.items() if until > now}

    def prefetch(self, block_fps: Sequence[bytes], blocks_per_chunk: int) -> None:
        self.view.prefetch(block_fps, blocks_per_chunk)

    def best_piece(self, block_fps: Sequence[bytes]) -> tuple[StoredChunk, int] | _Pending | None:
        found = self.view.best_piece(block_fps)
        if found is None or found is PENDING:
            return found
        piece, n = found
        sources = tuple(str(holder) for holder in piece.holders)
        if self._skipped:
            now = time.monotonic()
            sources = tuple(source for source in sources if self._skipped.get(source, 0.0) <= now)
            if not sources:
                return None  # every holder is being skipped: a miss now, asked again later
        return StoredChunk(piece.chunk.key, piece.chunk.block_fps, sources), n

    def skip_source(self, source: str, seconds: float) -> None:
        until = time.monotonic() + seconds
        self._skipped[source] = max(self._skipped.get(source, 0.0), until)

    def accepts_writes(self) -> bool:
        return False

    def up(self) -> bool:
        return self.view.up()

    def stored(self, key: bytes, block_fps: tuple[bytes, ...], nbytes: int) -> None:
        return None  # never written behind memory

    def forget(self, key: bytes) -> None:
        self.view.forget(key)

    def holdings_changed(self, changes: Sequence[tuple[str, HeldChange]]) -> None:
        for tier, change in changes:
            tiers = self._holding.get(change.key)
            if change.held:
                if tiers is not None:
                    tiers.add(tier)
                elif change.block_fps:  # a chunk already gone again by the time it was taken has none
                    self._holding[change.key] = {tier}
                    self.publisher.publish(change.key, change.block_fps)
            elif tiers is not None:
                tiers.discard(tier)
                if not tiers:
                    del self._holding[change.key]
                    self.publisher.withdraw(change.key)

    def clear(self, in_flight: Sequence[bytes] = ()) -> None:
        for key in self._holding:
            self.publisher.withdraw(key)
        self._holding.clear()

    def __len__(self) -> int:
        return 0  # what peers hold is learnt by asking (learns_by_asking)

    def held(self) -> int:
        """Chunks this instance publishes as held."""
        return len(self._holding)

    def take_counts(self) -> dict[str, float]:
        counts: dict[str, float] = {}
        for name, amount in [*self.view.take_counts().items(), *self.publisher.take_counts().items()]:
            key = _COUNTS.get(name)
            if key is not None:
                counts[key] = counts.get(key, 0) + amount
        return counts

    def close(self) -> None:
        self.publisher.close(leave=True)
        self.view.close()
        self.view.registry.close()
