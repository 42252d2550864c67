"""The worker-side half: moves bytes between vLLM's paged KV cache, the memory pool and the disk.

* ``register_kv_caches`` — views the KV cache as rows of bytes, allocates the pool once, opens the
  disk tier.
* ``start_load_kv`` (before the forward) — for a chunk promoted from disk, reads its file into the
  planned slot first (verified by checksum); then copies the planned slot ranges into the request's
  blocks. A load that fails (or reads a slot whose store failed) is reported through
  ``get_block_ids_with_load_errors`` so vLLM recomputes those blocks: wrong KV never reaches
  attention. A request whose load failed stores nothing this step, since what it computes may
  have attended to the bad blocks.
* ``wait_for_save`` (after the forward) — copies the blocks of each planned store into its slot;
  once a store's bytes are complete, its disk write (if planned) is queued for the background writer.
* ``take_report`` — which stores, disk writes and loads finished, for the scheduler's bookkeeping.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict

import torch

from ..config import LMCacheConfig
from ..ops import PagedKV
from ..stats import Counters
from ..tiers.disk import DiskTier
from ..tiers.disk_format import ChunkHeader, rank_tag
from ..tiers.memory import MemoryPool
from ..tiers.prefault import populate_in_background
from ..transfer import make_block_mover
from .geometry import Geometry
from .metadata import DiskRead, StepPlan, StoreSpec, WorkerReport

logger = logging.getLogger("lmcache_connector")


class WorkerSide:
    def __init__(self, config: LMCacheConfig, geometry: Geometry):
        self.config = config
        self.geometry = geometry
        self.paged: PagedKV | None = None
        self.pool: MemoryPool | None = None
        self.mover = None
        self.disk: DiskTier | None = None
        self._slot_valid: bytearray = bytearray()
        self._report = WorkerReport()
        self._load_errors: set[int] = set()
        self._failed_load_reqs: set[str] = set()
        self._disk_jobs: dict[int, StoreSpec] = {}  # store id -> store whose file waits for its bytes
        self.counters = Counters()

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.paged = PagedKV.from_layer_views(kv_caches)
        shape = self.paged.chunk_shape(self.geometry.blocks_per_chunk)
        slot_bytes = shape[0] * shape[1] * shape[2]
        num_slots = self.geometry.num_slots
        if num_slots and slot_bytes > self.geometry.slot_bytes:
            # Padded cross-layer rows can exceed vLLM's page sum; stay inside the configured bound.
            num_slots = self.config.max_local_cpu_bytes // slot_bytes
        self.pool = MemoryPool(num_slots, shape)
        self._slot_valid = bytearray(num_slots)
        self.mover = make_block_mover(self.paged)
        if self.paged.device.type == "cpu":
            # vLLM's CPU KV cache is committed page by page on first write. Loads write whole
            # chunks of blocks at once, so after a start every first hit would pay for those page
            # faults on its time-to-first-token; commit the (already budgeted) cache in the background.
            self._kv_prefault = populate_in_background(self.paged.storage)
        if self.config.local_disk:
            self.disk = DiskTier(
                self.config.local_disk,
                self.config.max_local_disk_bytes,
                self.geometry.namespace.digest().hex(),
                _this_rank(),
            )
            self._namespace_info = json.dumps(asdict(self.geometry.namespace), sort_keys=True)
        logger.info(
            "lmcache_connector worker: %d KV regions, %d B per block, memory pool %d slots x %.1f MiB%s",
            self.paged.num_regions,
            self.paged.block_bytes,
            num_slots,
            slot_bytes / 2**20,
            " (pinned)" if self.pool.pinned else "",
        )

    # ------------------------------------------------------------ loads

    def start_load_kv(self, plan: StepPlan) -> None:
        self._failed_load_reqs.clear()
        if self.pool is not None:
            for specs in plan.stores.values():
                for spec in specs:
                    self.pool.note_used(spec.slot)
        if not plan.loads:
            return
        for req_id, specs in plan.loads.items():
            for spec in specs:
                if req_id in self._failed_load_reqs or self.mover is None:
                    self._fail_load(req_id, spec.block_ids, spec.disk)
                    continue
                tier = "memory"
                started = time.perf_counter()
                try:
                    if spec.disk is not None:
                        tier = "disk"
                        self.pool.note_used(spec.slot)
                        self._promote(spec.slot, spec.disk)
                    self._load(spec.slot, spec.first_block, spec.block_ids)
                    self.counters.add(f"loaded_bytes.{tier}", len(spec.block_ids) * self.paged.block_bytes)
                    self.counters.add(f"load_seconds.{tier}", time.perf_counter() - started)
                except Exception as exc:  # a failed load is a recompute, never a crash
                    logger.warning("Load of %d blocks for request %s failed: %s", len(spec.block_ids), req_id, exc)
                    self._fail_load(req_id, spec.block_ids, spec.disk)
                    if spec.slot >= 0:
                        self._report.failed_load_slots.add(spec.slot)
        self._report.load_steps[plan.step] += 1

    def _promote(self, slot: int, read: DiskRead) -> None:
        """Fill ``slot`` from the chunk's file; the slot is valid only once the checksum matched."""
        if self.disk is None:
            raise RuntimeError("the disk tier is not open on this worker")
        self._slot_valid[slot] = 0
        view = self.pool.slot(slot, len(read.block_fps))
        self.disk.read_into(self._header(read.key, read.block_fps), _regions(view))
        self._slot_valid[slot] = 1
        self._report.stored[read.store_id] += 1

    def _fail_load(self, req_id: str, block_ids: list[int], read: DiskRead | None) -> None:
        self.counters.add("failed_loads")
        self._load_errors.update(block_ids)
        self._failed_load_reqs.add(req_id)
        if read is not None:
            self._report.failed_stores.add(read.store_id)
            self._report.disk_gone.add(bytes.fromhex(read.key))

    def _load(self, slot: int, first_block: int, block_ids: list[int]) -> None:
        if not 0 <= slot < len(self._slot_valid) or not self._slot_valid[slot]:
            raise RuntimeError(f"slot {slot} holds no stored chunk")
        self.mover.load(self.pool.slot(slot, len(block_ids), first_block), block_ids)

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    # ------------------------------------------------------------ stores

    def wait_for_save(self, plan: StepPlan) -> None:
        if self.mover is None:
            return
        for req_id, specs in plan.stores.items():
            for spec in specs:
                self._slot_valid[spec.slot] = 0
                if req_id in self._failed_load_reqs:
                    self._fail_store(spec)
                    continue
                started = time.perf_counter()
                try:
                    self.mover.store(spec.block_ids, self.pool.slot(spec.slot, len(spec.block_ids)), spec.store_id)
                    self._slot_valid[spec.slot] = 1
                    self.counters.add("stored_bytes.memory", len(spec.block_ids) * self.paged.block_bytes)
                    self.counters.add("store_seconds.memory", time.perf_counter() - started)
                    if spec.disk is not None:
                        self._disk_jobs[spec.store_id] = spec
                except Exception as exc:  # a failed store is a future miss
                    logger.warning("Store into slot %d failed: %s", spec.slot, exc)
                    self.counters.add("failed_stores.memory")
                    self._fail_store(spec)

    def _fail_store(self, spec: StoreSpec) -> None:
        self._report.failed_stores.add(spec.store_id)
        if spec.disk is not None:
            self._report.disk_failed.add(spec.store_id)

    def take_report(self) -> WorkerReport | None:
        if self.mover is not None:
            for store_id in self.mover.poll_stores():
                self._report.stored[store_id] += 1
                spec = self._disk_jobs.pop(store_id, None)
                if spec is not None:
                    self._submit_disk_write(spec)
        if self.disk is not None:
            self._collect_disk_results()
        report, self._report = self._report, WorkerReport()
        return report if report else None

    def _submit_disk_write(self, spec: StoreSpec) -> None:
        if self.disk is None:
            self._report.disk_failed.add(spec.store_id)
            return
        view = self.pool.slot(spec.slot, len(spec.block_ids))
        self.disk.submit_write(spec.store_id, self._header(spec.disk.key, spec.disk.block_fps), _regions(view))

    def _collect_disk_results(self) -> None:
        results, evicted = self.disk.take_results()
        for result in results:
            if result.ok:
                self._report.disk_written[result.store_id] += 1
                self.counters.add("stored_bytes.disk", result.nbytes)
                self.counters.add("store_seconds.disk", result.seconds)
            else:
                self._report.disk_failed.add(result.store_id)
                self.counters.add("failed_stores.disk")
        self._report.disk_gone.update(evicted)
        if evicted:
            self.counters.add("evictions.disk", len(evicted))
        if self.disk.disabled_reason is not None:
            self._report.disk_disabled = True

    def _header(self, key_hex: str, block_fps: list[str]) -> ChunkHeader:
        return ChunkHeader(
            key=key_hex,
            namespace=self.geometry.namespace.digest().hex(),
            rank=self.disk.rank,
            block_fps=tuple(block_fps),
            shape=self.paged.chunk_shape(len(block_fps)),
            namespace_info=self._namespace_info,
        )

    def shutdown(self) -> None:
        if self.mover is not None:
            for store_id in self.mover.wait_stores():
                spec = self._disk_jobs.pop(store_id, None)
                if spec is not None:
                    self._submit_disk_write(spec)
        if self.disk is not None:
            self.disk.close(self.config.disk_flush_timeout_secs)


def _regions(view: torch.Tensor) -> list[memoryview]:
    """Byte views of each region of a ``[R, n, row]`` slot view (each region's rows are contiguous)."""
    return [memoryview(region.numpy()).cast("B") for region in view]


def _this_rank() -> str:
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

        return rank_tag(get_tensor_model_parallel_rank(), get_pp_group().rank_in_group)
    except Exception:  # parallel state not initialised (a single process): rank 0
        return rank_tag(0, 0)
