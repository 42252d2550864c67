"""The worker-side half: moves bytes between vLLM's paged KV cache and the memory pool, as planned.

* ``register_kv_caches`` — views the KV cache as rows of bytes and allocates the pool once.
* ``start_load_kv`` (before the forward) — copies the planned slot ranges into the request's
  blocks. A load that fails (or reads a slot whose store failed) is reported through
  ``get_block_ids_with_load_errors`` so vLLM recomputes those blocks: wrong KV never reaches
  attention. A request whose load failed stores nothing this step, since what it computes may
  have attended to the bad blocks.
* ``wait_for_save`` (after the forward) — copies the blocks of each planned store into its slot.
* ``take_report`` — which stores and loads finished, for the scheduler's bookkeeping.
"""

from __future__ import annotations

import logging
import time

import torch

from ..config import LMCacheConfig
from ..ops import PagedKV
from ..stats import Counters
from ..tiers.memory import MemoryPool
from ..transfer import make_block_mover
from .geometry import Geometry
from .metadata import StepPlan, WorkerReport

logger = logging.getLogger("lmcache_connector")


class WorkerSide:
    def __init__(self, config: LMCacheConfig, geometry: Geometry):
        self.config = config
        self.geometry = geometry
        self.paged: PagedKV | None = None
        self.pool: MemoryPool | None = None
        self.mover = None
        self._slot_valid: bytearray = bytearray()
        self._report = WorkerReport()
        self._load_errors: set[int] = set()
        self._failed_load_reqs: set[str] = set()
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
        if not plan.loads:
            return
        if self.mover is None:
            for specs in plan.loads.values():
                for spec in specs:
                    self._load_errors.update(spec.block_ids)
            return
        for req_id, specs in plan.loads.items():
            for spec in specs:
                if req_id in self._failed_load_reqs:
                    self._load_errors.update(spec.block_ids)
                    continue
                started = time.perf_counter()
                try:
                    self._load(spec.slot, spec.first_block, spec.block_ids)
                    self.counters.add("loaded_bytes.memory", len(spec.block_ids) * self.paged.block_bytes)
                    self.counters.add("load_seconds.memory", time.perf_counter() - started)
                except Exception as exc:  # a failed load is a recompute, never a crash
                    logger.warning("Load of %d blocks for request %s failed: %s", len(spec.block_ids), req_id, exc)
                    self.counters.add("failed_loads")
                    self._load_errors.update(spec.block_ids)
                    self._failed_load_reqs.add(req_id)
                    if spec.slot >= 0:
                        self._report.failed_load_slots.add(spec.slot)
        self._report.load_steps[plan.step] += 1

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
                    self._report.failed_stores.add(spec.store_id)
                    continue
                started = time.perf_counter()
                try:
                    self.mover.store(spec.block_ids, self.pool.slot(spec.slot, len(spec.block_ids)), spec.store_id)
                    self._slot_valid[spec.slot] = 1
                    self.counters.add("stored_bytes.memory", len(spec.block_ids) * self.paged.block_bytes)
                    self.counters.add("store_seconds.memory", time.perf_counter() - started)
                except Exception as exc:  # a failed store is a future miss
                    logger.warning("Store into slot %d failed: %s", spec.slot, exc)
                    self.counters.add("failed_stores.memory")
                    self._report.failed_stores.add(spec.store_id)

    def take_report(self) -> WorkerReport | None:
        if self.mover is not None:
            for store_id in self.mover.poll_stores():
                self._report.stored[store_id] += 1
        report, self._report = self._report, WorkerReport()
        return report if report else None

    def shutdown(self) -> None:
        if self.mover is not None:
            self.mover.wait_stores()
