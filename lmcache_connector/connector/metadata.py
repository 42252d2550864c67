"""What the two halves of the connector tell each other, once per engine step.

scheduler -> worker: :class:`StepPlan` (inside ``SchedulerOutput.kv_connector_metadata``): which
slot ranges to copy into which blocks before the forward (loads), and which blocks to copy into
which slots after it (stores).

worker -> scheduler: :class:`WorkerReport` (``KVConnectorOutput.kv_connector_worker_meta``): which
stores and load steps finished or failed. vLLM merges the reports of all workers with
``aggregate``; the scheduler acts on a store only when every worker has reported it, because each
rank holds its own shard of the chunk.

Plain dataclasses of ints and lists: they are pickled across processes every step.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata


@dataclass
class DiskRead:
    """Before the load, fill the slot from this chunk's file (a promotion from disk to memory)."""

    key: str  # hex
    block_fps: list[str]  # hex, every block boundary of the chunk
    store_id: int  # the promotion is reported like a store into the slot


@dataclass
class LoadSpec:
    """Copy blocks ``[first_block, first_block + len(block_ids))`` of ``slot`` into ``block_ids``."""

    slot: int
    first_block: int
    block_ids: list[int]
    disk: DiskRead | None = None


@dataclass
class DiskWrite:
    """After the store, also write the slot to a chunk file in the background."""

    key: str  # hex
    block_fps: list[str]  # hex


@dataclass
class StoreSpec:
    """Copy ``block_ids`` into the first ``len(block_ids)`` blocks of ``slot``."""

    store_id: int
    slot: int
    block_ids: list[int]
    disk: DiskWrite | None = None


@dataclass
class StepPlan(KVConnectorMetadata):
    step: int
    loads: dict[str, list[LoadSpec]] = field(default_factory=dict)  # request id -> loads, in prompt order
    stores: dict[str, list[StoreSpec]] = field(default_factory=dict)  # request id -> stores


@dataclass
class WorkerReport(KVConnectorWorkerMetadata):
    stored: Counter = field(default_factory=Counter)  # store id -> workers that finished it
    failed_stores: set[int] = field(default_factory=set)
    load_steps: Counter = field(default_factory=Counter)  # step -> workers that ran its loads
    failed_load_slots: set[int] = field(default_factory=set)
    disk_written: Counter = field(default_factory=Counter)  # store id -> workers whose file is written
    disk_failed: set[int] = field(default_factory=set)
    disk_gone: set[bytes] = field(default_factory=set)  # chunk keys whose file was evicted or found bad
    disk_disabled: bool = False

    def aggregate(self, other: KVConnectorWorkerMetadata) -> WorkerReport:
        assert isinstance(other, WorkerReport)
        return WorkerReport(
            stored=self.stored + other.stored,
            failed_stores=self.failed_stores | other.failed_stores,
            load_steps=self.load_steps + other.load_steps,
            failed_load_slots=self.failed_load_slots | other.failed_load_slots,
            disk_written=self.disk_written + other.disk_written,
            disk_failed=self.disk_failed | other.disk_failed,
            disk_gone=self.disk_gone | other.disk_gone,
            disk_disabled=self.disk_disabled or other.disk_disabled,
        )

    def __bool__(self) -> bool:
        return bool(
            self.stored
            or self.failed_stores
            or self.load_steps
            or self.failed_load_slots
            or self.disk_written
            or self.disk_failed
            or self.disk_gone
            or self.disk_disabled
        )
