"""The contract every secondary medium (disk, remote, peer, or one registered from outside) keeps.

Memory is the primary tier: its index (:mod:`lmcache_connector.tiers.memory.index`) owns slots,
recency and pins, and every byte that reaches or leaves vLLM's paged KV cache passes through a
memory slot. A secondary medium is

* **written behind** a memory slot: after a chunk's store completes, each rank writes its slot to
  the medium in the background; the slot stays pinned until every rank reported its write;
* **filled into** a memory slot before a load (a *fill*, or promotion), read and verified by each
  rank; a fill that finds nothing (the medium evicted it meanwhile) or finds bad bytes is a miss and
  a recompute, never an error and never KV in attention;
* the owner of its own capacity (a folder, a Redis ``maxmemory``, a peer), shared with others, and
  allowed to be stale.

It comes as two halves, built from the same configuration in different processes:

:class:`Catalog` (scheduler side): which chunks the medium holds; no bytes; never blocks the
scheduler. ``best_piece`` answers from what it knows; a catalog that asked the network and has no
answer yet says :data:`PENDING`, and the connector tells vLLM to ask again later.

:class:`Store` (worker side, one rank's bytes): ``submit_write`` returns at once (results come
back through ``take_results``); ``read_into`` fills buffers and verifies them, raising
:class:`ChunkMiss` when the bytes are not there or not right.

A medium whose fills are slow (network, cold disk) sets ``Catalog.asynchronous`` (or answers per chunk
in ``fills_asynchronously``): its fills run in the background through vLLM's asynchronous-load
path, so one slow read never stalls the batch.

A medium whose chunks are announced to routers (vLLM's KV-cache events) names its
``Catalog.event_medium`` (the disk tier: ``"STORAGE"``); once asked to ``track_changes``, its catalog
records every chunk it starts or stops holding, and ``take_changes`` hands them over. Its store sets
``Store.keeps_event_info`` when it keeps the connector's ``event_info`` text with the chunk (the
disk tier: in the file header), so the chunk can be announced again after a restart.

A medium that follows what this instance holds (the peer tier publishes it to a registry) sets
``Catalog.watches_holdings``: the planner then hands it, through ``holdings_changed``, every chunk
the memory tier and each announced secondary start or stop holding (the same changes the KV-cache
events use). Its store may ``attach`` to the rank's memory slots and other stores, to read them.

Registering a medium from outside the package: :mod:`lmcache_connector.tiers.registry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass


class _Pending:
    def __repr__(self) -> str:
        return "PENDING"


PENDING = _Pending()  # a catalog's "not known yet": ask again later


class ChunkMiss(Exception):
    """A fill found no usable chunk (gone, truncated, corrupt or foreign): a miss, then a recompute.

    ``gone`` says the catalog should forget the chunk (it is not there, or never will be usable).
    """

    def __init__(self, message: str, gone: bool = True):
        super().__init__(message)
        self.gone = gone


@dataclass(frozen=True)
class StoredChunk:
    """A chunk a catalog knows of: its key (the fingerprint of its last block) and every block boundary.

    ``sources``: where a fill may read it (the peer tier: the instances holding it, as the registry
    names them); empty when the medium's store knows by itself."""

    key: bytes
    block_fps: tuple[bytes, ...]
    sources: tuple[str, ...] = ()

    @property
    def num_blocks(self) -> int:
        return len(self.block_fps)


@dataclass(frozen=True)
class HeldChange:
    """A chunk a catalog started (``held``) or stopped holding, for the KV-cache events.

    ``event_info`` is what the medium kept with the chunk (``Store.keeps_event_info``), read back
    when the catalog found the chunk itself (at start, or in a rescan); empty otherwise.
    ``block_fps``: the chunk's block boundaries, on a ``held`` change where the tier still knows them."""

    key: bytes
    held: bool
    event_info: str = ""
    block_fps: tuple[bytes, ...] = ()


@dataclass
class WriteResult:
    """One rank's write of one chunk to a medium, done or failed."""

    job_id: int
    ok: bool
    nbytes: int = 0  # KV bytes written
    seconds: float = 0.0


class Catalog(ABC):
    """Scheduler side of a medium. Every method returns at once."""

    name: str = "secondary"  # the tier's name in plans, stats and logs
    hit_source: str = "external_unspecified"  # vLLM's CacheHitSource for hits it supplies
    asynchronous: bool = False  # fills through vLLM's asynchronous-load path (see fills_asynchronously)
    order: int = 50  # place in the lookup chain after memory: disk 10, peer 20, remote 30
    # True when the catalog learns what the medium holds by asking it (a store other engines fill):
    # knowing no chunk yet is then no reason to skip a lookup.
    learns_by_asking: bool = False
    # vLLM's KV-event medium under which the connector announces the chunks held here ("STORAGE"),
    # or None: never announced (e.g. a store shared by every replica, whose removals nobody sees).
    event_medium: str | None = None
    # True: the planner calls holdings_changed with what this instance starts or stops holding.
    watches_holdings: bool = False

    def poll(self) -> None:
        """Take in what background work found since the last call (called every step)."""
        return None

    def prefetch(self, block_fps: Sequence[bytes], blocks_per_chunk: int) -> None:
        """A prompt's block fingerprints, before the lookup chain asks about it chunk by chunk: a
        catalog that asks the network asks about all of its chunks at once."""
        return None

    @abstractmethod
    def best_piece(self, block_fps: Sequence[bytes]) -> tuple[StoredChunk, int] | _Pending | None:
        """The held chunk covering the most leading blocks of one chunk's ``block_fps``, and how many."""

    def fills_asynchronously(self, chunk: StoredChunk) -> bool:
        """Whether a fill of ``chunk`` goes through vLLM's asynchronous-load path. A medium may
        decide per chunk (the disk tier: by whether its file is in the page cache); by default,
        :attr:`asynchronous`."""
        return self.asynchronous

    def __contains__(self, key: bytes) -> bool:
        return False

    def __len__(self) -> int:
        return 0

    def touch(self, key: bytes) -> None:
        """The chunk was just used (recency), in the background."""
        return None

    def accepts_writes(self) -> bool:
        return True

    def up(self) -> bool:
        """Whether the medium is reachable now (``lmcache_connector_tier_up``); a medium that is
        down answers misses and takes no writes until it is back."""
        return True

    def take_counts(self) -> dict[str, float]:
        """Counters since the last call, keyed as in :mod:`lmcache_connector.counters`."""
        return {}

    @abstractmethod
    def stored(self, key: bytes, block_fps: tuple[bytes, ...], nbytes: int) -> None:
        """Every rank wrote the chunk."""

    @abstractmethod
    def forget(self, key: bytes) -> None:
        """The chunk is gone (evicted, or found bad by a fill)."""

    def writes_stopped(self) -> None:
        """A worker stopped writing to this medium (e.g. a read-only folder): plan no more writes."""
        return None

    def skip_source(self, source: str, seconds: float) -> None:
        """A worker skips ``source`` (one of ``StoredChunk.sources``) for ``seconds``: plan no fill
        from it meanwhile (:meth:`Store.take_skipped_sources`)."""
        return None

    def discard(self, key: bytes) -> None:
        """Forget the chunk and remove it from the medium (a write that landed after a reset)."""
        self.forget(key)

    def clear(self, in_flight: Sequence[bytes] = ()) -> None:
        """Forget (and remove) every chunk of this namespace; ``in_flight`` ones may still land."""
        return None

    def usage(self) -> int:
        return 0

    def capacity(self) -> int:
        return 0

    def track_changes(self) -> None:
        """From now on record (for :meth:`take_changes`) every chunk that becomes held or stops
        being held, starting with those held now. Only called when KV-cache events are on."""
        return None

    def take_changes(self) -> list[HeldChange]:
        """Changes since the last call, in order (empty unless :meth:`track_changes` was called)."""
        return []

    def holdings_changed(self, changes: Sequence[tuple[str, HeldChange]]) -> None:
        """``(tier, change)``: chunks the memory tier or a secondary started or stopped holding, in
        order (only for a catalog that ``watches_holdings``)."""
        return None

    def close(self) -> None:
        return None


class Store(ABC):
    """Worker side of a medium: one rank's bytes."""

    # True: ``submit_write`` also takes ``event_info=`` (text to keep with the chunk and hand back
    # through the catalog's ``HeldChange`` after a restart).
    keeps_event_info: bool = False
    # How many fills of one background load may read from this store at once (``read_into`` is then
    # called from that many threads): more than 1 where a read waits on the network, not the CPU.
    read_concurrency: int = 1

    @abstractmethod
    def submit_write(self, job_id: int, key: bytes, block_fps: Sequence[bytes], regions: Sequence[memoryview]) -> None:
        """Write the chunk (``regions``: its bytes, region by region) in the background; the buffers
        stay untouched until the result is taken."""

    @abstractmethod
    def read_into(self, key: bytes, block_fps: Sequence[bytes], regions: Sequence[memoryview]) -> None:
        """Fill ``regions`` with the chunk's verified bytes, or raise :class:`ChunkMiss`. A chunk
        whose catalog named ``StoredChunk.sources`` is read with ``sources=`` those (the peer tier:
        the instances holding it)."""

    @abstractmethod
    def take_results(self) -> tuple[list[WriteResult], list[bytes]]:
        """Writes finished since the last call, and keys of chunks the medium dropped meanwhile."""

    def writes_stopped(self) -> bool:
        return False

    def take_skipped_sources(self) -> dict[str, float]:
        """Sources (``StoredChunk.sources``) this rank started skipping since the last call, and for
        how many seconds (the peer tier: a peer that failed). The scheduler plans no fill from them
        meanwhile, so a request does not wait for a load that will fail at once."""
        return {}

    def attach(self, slots, stores: dict[str, Store]) -> None:
        """Called once every store of the rank is open: ``slots`` is the rank's
        :class:`~lmcache_connector.tiers.memory.slots.SlotTable` (which chunk each memory slot holds
        now, kept by the worker), ``stores`` every store by tier name. A medium that serves other
        instances (the peer tier) reads from them; others ignore it."""
        return None

    def take_counts(self) -> dict[str, float]:
        """Counters since the last call, keyed as in :mod:`lmcache_connector.counters`."""
        return {}

    def flush(self, timeout: float) -> bool:
        return True

    def close(self, timeout: float) -> None:
        return None


class Medium(ABC):
    """A kind of secondary tier: builds its two halves from the configuration (or ``None`` when off).

    ``chunk_shape(num_blocks)`` (worker side) is the ``(regions, blocks, row_bytes)`` shape of a
    chunk's bytes on this rank; ``rank`` is the rank's tag (``tp0pp0``).
    """

    name: str = "secondary"

    @abstractmethod
    def catalog(self, config, geometry) -> Catalog | None: ...

    @abstractmethod
    def store(self, config, geometry, rank: str, chunk_shape) -> Store | None: ...
