"""What the two halves of the connector tell each other, once per engine step.

scheduler -> worker: :class:`StepPlan` (inside ``SchedulerOutput.kv_connector_metadata``), run by
every worker in this order:

1. ``fills`` — before anything else, fill memory-pool slots from a secondary tier (a promotion
   from disk). Every slot handed out this step (``new_slots``: to a fill or a store, even one the
   scheduler then dropped) is invalid on the worker until its fill or store completes, so a load
   can never read what an evicted chunk left behind.
2. ``loads`` — copy slot ranges into the request's blocks, before the forward. A load whose slot
   is :data:`FAILED_SLOT` (the plan could not cover what vLLM was promised) only reports its
   blocks as load errors.
3. ``stores`` — after the forward, copy the blocks of each new chunk into its slot. A store is
   dropped when any block it was computed from (``prefix_blocks[req][:spec.end_block]``) failed to
   load in this step: it would hold KV computed by attention over wrong bytes.

worker -> scheduler: :class:`WorkerReport` (``KVConnectorOutput.kv_connector_worker_meta``): per job,
how many ranks finished it and how many failed it. vLLM merges the reports of all workers with
``aggregate`` (counts add up), and the scheduler resolves a job only when every rank has reported
(:class:`~lmcache_connector.ledger.ReportLedger`).

Plain dataclasses of ints and lists, importing neither vLLM nor torch: they are pickled across
processes every step. vLLM carries them as its ``KVConnectorMetadata`` and
``KVConnectorWorkerMetadata`` without checking their type; all it needs is ``aggregate``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# A load spec with this slot tells the worker to report its blocks as failed.
FAILED_SLOT = -1


@dataclass
class Fill:
    """Before any load, fill ``slot`` from a secondary tier (a promotion into memory)."""

    store_id: int  # reported like a store into the slot
    slot: int
    req_id: str  # the request whose lookup asked for it (its later fills are skipped after a failure)
    tier: str  # the secondary medium it is read from
    key: bytes
    block_fps: list[bytes]  # every block boundary of the chunk
    first_block: int = 0  # the chunk's first block in the request's prompt
    sources: list[str] = field(default_factory=list)  # where to read it (the peer tier: its holders)


@dataclass
class LoadSpec:
    """Copy blocks ``[first_block, first_block + len(block_ids))`` of ``slot`` into ``block_ids``."""

    slot: int
    first_block: int
    block_ids: list[int]


@dataclass
class StoreSpec:
    """Copy ``block_ids`` into the first ``len(block_ids)`` blocks of ``slot``.

    ``end_block`` is the chunk's end as an index into the request's blocks: the chunk's KV was
    computed from the request's blocks ``[0, end_block)``.
    """

    store_id: int
    slot: int
    block_ids: list[int]
    end_block: int
    key: bytes = b""
    block_fps: list[bytes] = field(default_factory=list)
    writes: list[str] = field(default_factory=list)  # secondary tiers to write the slot to, behind the store
    event_info: str = ""  # the glue's KV-event description, kept by tiers that keep it (a file header)


@dataclass
class AsyncLoad:
    """A request's load that runs in the background: fills, then loads, reported through vLLM's
    asynchronous-load path (``get_finished``) once every load of it is done or failed."""

    fills: list[Fill] = field(default_factory=list)
    loads: list[LoadSpec] = field(default_factory=list)


@dataclass
class StepPlan:
    step: int
    fills: list[Fill] = field(default_factory=list)
    loads: dict[str, list[LoadSpec]] = field(default_factory=dict)  # request id -> loads, in prompt order
    async_loads: dict[str, AsyncLoad] = field(default_factory=dict)  # request id -> its background load
    stores: dict[str, list[StoreSpec]] = field(default_factory=dict)  # request id -> stores
    prefix_blocks: dict[str, list[int]] = field(default_factory=dict)  # request id -> its blocks up to its last store
    new_slots: list[int] = field(default_factory=list)  # every slot handed out this step, sent or not
    idle: bool = False  # vLLM scheduled no tokens: the step only waits for background loads
    forget_slots: bool = False  # a cache reset: no slot's bytes may be served to peers any more


@dataclass
class WorkerReport:
    stored: Counter = field(default_factory=Counter)  # store/fill id -> ranks that finished it
    failed_stores: Counter = field(default_factory=Counter)  # store/fill id -> ranks that failed it
    load_steps: Counter = field(default_factory=Counter)  # step -> ranks that ran its loads
    failed_load_slots: set[int] = field(default_factory=set)
    written: Counter = field(default_factory=Counter)  # (tier, store id) -> ranks whose write is done
    write_failed: Counter = field(default_factory=Counter)  # (tier, store id) -> ranks whose write failed
    gone: set[tuple[str, bytes]] = field(default_factory=set)  # (tier, chunk key) evicted or found bad
    writes_stopped: set[str] = field(default_factory=set)  # tiers a rank stopped writing to
    skipped_sources: dict[tuple[str, str], float] = field(default_factory=dict)  # (tier, source) -> seconds
    async_done: Counter = field(default_factory=Counter)  # request id -> ranks that finished its async load
    worker_disabled: bool = False  # a rank cannot move bytes at all (e.g. unusable KV layout)

    def aggregate(self, other: WorkerReport) -> WorkerReport:
        assert isinstance(other, WorkerReport)
        return WorkerReport(
            stored=self.stored + other.stored,
            failed_stores=self.failed_stores + other.failed_stores,
            load_steps=self.load_steps + other.load_steps,
            failed_load_slots=self.failed_load_slots | other.failed_load_slots,
            written=self.written + other.written,
            write_failed=self.write_failed + other.write_failed,
            gone=self.gone | other.gone,
            writes_stopped=self.writes_stopped | other.writes_stopped,
            skipped_sources={
                key: max(self.skipped_sources.get(key, 0.0), other.skipped_sources.get(key, 0.0))
                for key in self.skipped_sources.keys() | other.skipped_sources.keys()
            },
            async_done=self.async_done + other.async_done,
            worker_disabled=self.worker_disabled or other.worker_disabled,
        )

    def __bool__(self) -> bool:
        return bool(
            self.stored
            or self.failed_stores
            or self.load_steps
            or self.failed_load_slots
            or self.written
            or self.write_failed
            or self.gone
            or self.writes_stopped
            or self.skipped_sources
            or self.async_done
            or self.worker_disabled
        )
