"""The worker side of the peer tier: one rank serves its chunks to peers and fetches theirs.

:class:`PeerStore` is the tier contract's store (:mod:`lmcache_connector.tiers.base`) for one
worker rank:

* **serving**: once the rank's stores are open (``attach``), a :class:`~.server.PeerServer` listens
  on ``LMCACHE_DISTRIBUTED_URL``'s port + the worker's rank (:func:`~.addresses.worker_rank`),
  with ``LMCACHE_P2P_AUTH_TOKEN`` when set. It reads from a :class:`TierSource`: the memory pool
  first (through the worker's :class:`~.source.SlotTable`, so a slot rewritten during the copy is
  a miss), then the rank's disk tier (each file verified as it is read). A port that is taken is
  one error line: the rank still fetches, it only serves nothing;
* **fetching** (``read_into``, a fill): the plan's fill names the holders the registry gave
  (``Fill.sources``); the chunk's shard of this rank is fetched from the same rank of each holder
  in turn (:func:`~.client.fetch_from_holders`), straight into the memory slot and verified, within
  ``LMCACHE_BLOCKING_TIMEOUT_SECS``. A holder that fails is skipped for a while
  (:class:`~.client.PeerHealth`: one warning per peer that goes bad), and the scheduler is told
  (``take_skipped_sources``, by the name the plan gave it) so it plans no fill from it meanwhile.
  Nothing usable from any holder is a :class:`~lmcache_connector.tiers.base.ChunkMiss`: the
  request recomputes, and with tensor parallelism the scheduler's report ledger makes the chunk a
  miss on every rank.

The tier takes no writes (its catalog never plans one).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from lmcache_connector.tiers.base import ChunkMiss, Store, WriteResult
from lmcache_connector.tiers.memory.slots import ChunkCopy, LentChunk, Shape, SlotTable
from lmcache_connector.tiers.peer.addresses import InstanceId, PeerAddress
from lmcache_connector.tiers.peer.client import ChunkWant, PeerClient, PeerHealth, fetch_from_holders
from lmcache_connector.tiers.peer.server import PeerServer

logger = logging.getLogger("lmcache_connector")

# The server's counters that the connector exports (lmcache_connector.counters).
_SERVER_COUNTS = {"peer_served_chunks": "served_chunks.peer", "peer_served_bytes": "served_bytes.peer"}


class TierSource:
    """A rank's chunks for its peer server: memory slots first, then the disk tier (a ChunkSource)."""

    def __init__(self, slots: SlotTable, disk: Store | None, chunk_shape: Callable[[int], Shape]):
        self.slots = slots
        self.disk = disk
        self.chunk_shape = chunk_shape

    def lend(self, key: bytes, block_fps: tuple[bytes, ...]) -> LentChunk | None:
        return self.slots.lend(key, block_fps)  # memory only: a disk chunk is read (and verified) first

    def read(self, key: bytes, block_fps: tuple[bytes, ...], scratch: Callable[[int], memoryview]) -> ChunkCopy | None:
        copy = self.slots.read(key, block_fps, scratch)
        if copy is not None or self.disk is None:
            return copy
        shape = self.chunk_shape(len(block_fps))
        regions, blocks, row = shape
        data = scratch(regions * blocks * row)
        size = blocks * row
        try:
            self.disk.read_into(key, block_fps, [data[i * size : (i + 1) * size] for i in range(regions)])
        except ChunkMiss:
            return None  # not on disk either (or not whole): MISSING for the peer
        return ChunkCopy(shape, data)


class PeerStore(Store):
    # A load's chunks are fetched concurrently (each fetch waits on a peer; the client is
    # thread-safe and keeps a few connections per peer; a server takes 16 at once).
    read_concurrency = 4

    def __init__(
        self,
        client: PeerClient,
        worker_rank: int,
        bind: PeerAddress,
        chunk_shape: Callable[[int], Shape],
        timeout_s: float,
        token: bytes | None = None,
        health: PeerHealth | None = None,
    ):
        self.client = client
        self.worker_rank = worker_rank
        self.bind = bind
        self.chunk_shape = chunk_shape
        self.timeout_s = timeout_s
        self.token = token
        self.health = health or PeerHealth()
        self.server: PeerServer | None = None
        # This rank's address of each holder -> the holder as the plan names it (its source), so
        # the peers it skips are reported to the scheduler by the names the scheduler knows.
        self._source_of: dict[str, str] = {}

    def attach(self, slots: SlotTable, stores: dict[str, Store]) -> None:
        source = TierSource(slots, stores.get("disk"), self.chunk_shape)
        server = PeerServer(
            source, self.client.namespace_hex, self.client.tp_rank, self.client.pp_rank, self.bind, self.token
        )
        try:
            self.server = server.start()
        except OSError as exc:
            server.close(timeout=1)
            logger.error("lmcache_connector: %s; this rank fetches from peers but serves none", exc)
            return
        logger.info("lmcache_connector: serving peers on %s (rank %s)", self.bind, self.client.rank)

    def read_into(
        self, key: bytes, block_fps: Sequence[bytes], regions: Sequence[memoryview], sources: Sequence[str] = ()
    ) -> None:
        holders = []
        for source in sources:
            instance = InstanceId.parse(source)
            if instance is None:
                continue
            try:
                address = instance.address.for_rank(self.worker_rank)
            except ValueError:
                continue  # a holder whose ports end before this rank's: not one of ours
            holders.append(address)
            self._source_of[str(address)] = source
        if not holders:
            raise ChunkMiss(f"no peer holds chunk {key.hex()[:12]}")
        want = ChunkWant(tuple(block_fps), self.chunk_shape(len(block_fps)), regions)
        (found,) = fetch_from_holders(self.client, self.health, holders, [want], self.timeout_s)
        if not found:
            raise ChunkMiss(f"none of {len(holders)} peers sent chunk {key.hex()[:12]} whole and verified")

    def submit_write(self, job_id: int, key: bytes, block_fps: Sequence[bytes], regions: Sequence[memoryview]) -> None:
        raise RuntimeError("the peer tier takes no writes")

    def take_results(self) -> tuple[list[WriteResult], list[bytes]]:
        return [], []

    def take_skipped_sources(self) -> dict[str, float]:
        news = self.health.take_news()
        return {self._source_of[peer]: seconds for peer, seconds in news.items() if peer in self._source_of}

    def take_counts(self) -> dict[str, float]:
        counts = {"remote_failures": self.health.take_counts().get("peer_failures", 0)}
        if self.server is not None:
            for name, amount in self.server.take_counts().items():
                if name in _SERVER_COUNTS:
                    counts[_SERVER_COUNTS[name]] = amount
        return {key: amount for key, amount in counts.items() if amount}

    def close(self, timeout: float) -> None:
        if self.server is not None:
            self.server.close(timeout=min(timeout, 5.0))
        self.client.close()
