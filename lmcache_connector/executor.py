"""The worker-side half: moves bytes between vLLM's paged KV cache, the memory pool and the disk.

* ``register_kv_caches`` — views the KV cache as rows of bytes, allocates the pool once, opens the
  disk tier. If that fails the worker is *disabled*: it reports so every step, and the scheduler
  stops matching and storing (nothing stays pinned waiting for a worker that will never answer).
* ``start_load_kv`` (before the forward) — first invalidates every slot this step hands out, then
  runs the fills (chunk files read into their slots, verified by checksum), then the loads. A slot
  is loadable only once its store or fill has completed, so a load never copies bytes an evicted
  chunk left in the slot. A load that fails is reported through ``get_block_ids_with_load_errors``
  so vLLM recomputes those blocks: wrong KV never reaches attention.
* ``wait_for_save`` (after the forward) — copies the blocks of each planned store into its slot,
  except stores computed from a block whose load failed in this step (they would hold KV computed
  by attention over wrong bytes); once a store's bytes are complete, its disk write (if planned) is
  queued for the background writer.
* ``take_report`` — per job, this rank's outcome (done or failed), for the scheduler's ledger.

The worker's rank is a parameter (vLLM's parallel state in production), so tests can run several
ranks in one process.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict

import torch

from lmcache_connector.config import LMCacheConfig
from lmcache_connector.connector.geometry import Geometry
from lmcache_connector.counters import Counters
from lmcache_connector.ops import PagedKV
from lmcache_connector.ops.mover import make_block_mover
from lmcache_connector.plan import FAILED_SLOT, Fill, StepPlan, StoreSpec, WorkerReport
from lmcache_connector.tiers.disk.format import ChunkFileError, ChunkHeader, rank_tag
from lmcache_connector.tiers.disk.store import DiskTier
from lmcache_connector.tiers.memory.pool import MemoryPool
from lmcache_connector.tiers.memory.prefault import populate_in_background

logger = logging.getLogger("lmcache_connector")


class WorkerSide:
    def __init__(self, config: LMCacheConfig, geometry: Geometry, rank: tuple[int, int] = (0, 0)):
        self.config = config
        self.geometry = geometry
        self.rank = rank_tag(*rank)
        self.paged: PagedKV | None = None
        self.pool: MemoryPool | None = None
        self.mover = None
        self.disk: DiskTier | None = None
        self._slot_valid: bytearray = bytearray()
        self._report = WorkerReport()
        self._load_errors: set[int] = set()
        self._step_errors: tuple[int, set[int]] = (-1, set())  # (step, blocks whose load failed in it)
        self._filled: dict[int, float] = {}  # slot filled this step -> seconds it took
        self._handled: set[int] = set()  # store/fill ids of the bound step this rank already reported on
        self._disk_jobs: dict[int, StoreSpec] = {}  # store id -> store whose file waits for its bytes
        self.counters = Counters()

    @property
    def disabled(self) -> bool:
        return self.mover is None

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        paged = PagedKV.from_layer_views(kv_caches)
        shape = paged.chunk_shape(self.geometry.blocks_per_chunk)
        slot_bytes = shape[0] * shape[1] * shape[2]
        num_slots = self.geometry.num_slots
        if num_slots and slot_bytes > self.geometry.slot_bytes:
            # The scheduler hands out geometry.num_slots slots: the worker must hold every one of
            # them within the configured size, or slot numbers would mean different bytes.
            raise ValueError(
                f"this rank's chunk is {slot_bytes} bytes but the scheduler planned {self.geometry.slot_bytes}"
            )
        pool = MemoryPool(num_slots, shape)
        disk = None
        if self.config.local_disk:
            disk = DiskTier(
                self.config.local_disk,
                self.config.max_local_disk_bytes,
                self.geometry.namespace.digest().hex(),
                self.rank,
            )
            self._namespace_info = json.dumps(asdict(self.geometry.namespace), sort_keys=True)
        self.paged, self.pool, self.disk = paged, pool, disk
        self._slot_valid = bytearray(num_slots)
        self.mover = make_block_mover(paged)
        if paged.device.type == "cpu":
            # vLLM's CPU KV cache is committed page by page on first write. Loads write whole
            # chunks of blocks at once, so after a start every first hit would pay for those page
            # faults on its time-to-first-token; commit the (already budgeted) cache in the background.
            self._kv_prefault = populate_in_background(paged.storage)
        logger.info(
            "lmcache_connector worker %s: %d KV regions, %d B per block, memory pool %d slots x %.1f MiB%s",
            self.rank,
            paged.num_regions,
            paged.block_bytes,
            num_slots,
            slot_bytes / 2**20,
            " (pinned)" if pool.pinned else "",
        )

    # ------------------------------------------------------------ loads

    def start_load_kv(self, plan: StepPlan) -> None:
        self._begin_step(plan)
        if self.pool is not None:
            for specs in plan.stores.values():
                for spec in specs:
                    self.pool.note_used(spec.slot)
        self._run_fills(plan.fills)
        for req_id, specs in plan.loads.items():
            failed = False
            for spec in specs:
                if failed or spec.slot == FAILED_SLOT or self.disabled:
                    self._fail_load(spec.block_ids)
                    continue
                started = time.perf_counter()
                try:
                    self._load(spec.slot, spec.first_block, spec.block_ids)
                except Exception as exc:  # a failed load is a recompute, never a crash
                    logger.warning("Load of %d blocks for request %s failed: %s", len(spec.block_ids), req_id, exc)
                    self._fail_load(spec.block_ids)
                    self._report.failed_load_slots.add(spec.slot)
                    failed = True  # vLLM recomputes from the first failed block: later loads are wasted
                    continue
                tier = "disk" if spec.slot in self._filled else "memory"
                seconds = time.perf_counter() - started + self._filled.pop(spec.slot, 0.0)
                self.counters.add(f"loaded_bytes.{tier}", len(spec.block_ids) * self.paged.block_bytes)
                self.counters.add(f"load_seconds.{tier}", seconds)
        if plan.loads:
            self._report.load_steps[plan.step] += 1

    def _begin_step(self, plan: StepPlan) -> None:
        if self._step_errors[0] == plan.step:
            return  # already begun (start_load_kv after a failed attempt)
        self._step_errors = (plan.step, set())
        self._filled = {}
        self._handled = set()
        # Every slot handed out this step holds nothing loadable until its fill or store completes.
        for slot in plan.new_slots:
            self._invalidate(slot)

    def _invalidate(self, slot: int) -> None:
        if 0 <= slot < len(self._slot_valid):
            self._slot_valid[slot] = 0

    def _run_fills(self, fills: list[Fill]) -> None:
        """Promotions: read each chunk file into its slot; the slot is valid only once verified."""
        failed_requests: set[str] = set()
        for fill in fills:
            if fill.store_id in self._handled:
                continue
            self._handled.add(fill.store_id)
            if fill.req_id in failed_requests or self.disabled or self.disk is None:
                # Skipped, not failed: the file is still good, so the catalog keeps it.
                self._report.failed_stores[fill.store_id] += 1
                continue
            started = time.perf_counter()
            try:
                self.pool.note_used(fill.slot)
                view = self.pool.slot(fill.slot, len(fill.block_fps))
                self.disk.read_into(self._header(fill.key, fill.block_fps), _regions(view))
            except Exception as exc:
                if isinstance(exc, ChunkFileError):  # missing, corrupt or foreign: the catalog forgets it
                    self._report.disk_gone.add(bytes.fromhex(fill.key))
                logger.warning("Reading chunk %s from disk failed: %s", fill.key[:12], exc)
                self.counters.add("failed_loads")
                self._report.failed_stores[fill.store_id] += 1
                failed_requests.add(fill.req_id)
                continue
            self._slot_valid[fill.slot] = 1
            self._filled[fill.slot] = time.perf_counter() - started
            self._report.stored[fill.store_id] += 1

    def _fail_load(self, block_ids: list[int]) -> None:
        self.counters.add("failed_loads")
        self._load_errors.update(block_ids)
        self._step_errors[1].update(block_ids)

    def _load(self, slot: int, first_block: int, block_ids: list[int]) -> None:
        if not 0 <= slot < len(self._slot_valid) or not self._slot_valid[slot]:
            raise RuntimeError(f"slot {slot} holds no stored chunk")
        self.mover.load(self.pool.slot(slot, len(block_ids), first_block), block_ids)

    def abort_loads(self, plan: StepPlan) -> None:
        """``start_load_kv`` raised: every planned load is an error, every fill not yet done failed."""
        self._begin_step(plan)
        for specs in plan.loads.values():
            for spec in specs:
                self._fail_load(spec.block_ids)
        for fill in plan.fills:
            if fill.store_id not in self._handled:
                self._handled.add(fill.store_id)
                self._report.failed_stores[fill.store_id] += 1
        if plan.loads:
            self._report.load_steps[plan.step] += 1

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    # ------------------------------------------------------------ stores

    def wait_for_save(self, plan: StepPlan) -> None:
        self._begin_step(plan)
        errors = self._step_errors[1]
        for req_id, specs in plan.stores.items():
            poisoned_from = _first_failed(plan.prefix_blocks.get(req_id, ()), errors)
            for spec in specs:
                if spec.store_id in self._handled:
                    continue
                self._handled.add(spec.store_id)
                self._invalidate(spec.slot)
                if self.disabled or spec.end_block > poisoned_from:
                    self._fail_store(spec)
                    continue
                started = time.perf_counter()
                try:
                    self.mover.store(spec.block_ids, self.pool.slot(spec.slot, len(spec.block_ids)), spec.store_id)
                except Exception as exc:  # a failed store is a future miss
                    logger.warning("Store into slot %d failed: %s", spec.slot, exc)
                    self.counters.add("failed_stores.memory")
                    self._fail_store(spec)
                    continue
                self._slot_valid[spec.slot] = 1
                self.counters.add("stored_bytes.memory", len(spec.block_ids) * self.paged.block_bytes)
                self.counters.add("store_seconds.memory", time.perf_counter() - started)
                if spec.disk is not None:
                    self._disk_jobs[spec.store_id] = spec

    def abort_stores(self, plan: StepPlan) -> None:
        """``wait_for_save`` raised: every store it did not reach is failed (its slot must not stay pinned)."""
        for specs in plan.stores.values():
            for spec in specs:
                if spec.store_id not in self._handled:
                    self._handled.add(spec.store_id)
                    self._invalidate(spec.slot)
                    self._fail_store(spec)

    def _fail_store(self, spec: StoreSpec) -> None:
        self._report.failed_stores[spec.store_id] += 1
        if spec.disk is not None:
            self._report.disk_failed[spec.store_id] += 1

    def take_report(self) -> WorkerReport | None:
        if self.disabled:
            self._report.worker_disabled = True
        else:
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
        try:
            view = self.pool.slot(spec.slot, len(spec.block_ids))
            self.disk.submit_write(spec.store_id, self._header(spec.disk.key, spec.disk.block_fps), _regions(view))
        except Exception as exc:  # the write is a future miss; its slot must not stay pinned
            logger.warning("Queueing chunk %s for disk failed: %s", spec.disk.key[:12], exc)
            self._report.disk_failed[spec.store_id] += 1

    def _collect_disk_results(self) -> None:
        results, evicted = self.disk.take_results()
        for result in results:
            if result.ok:
                self._report.disk_written[result.store_id] += 1
                self.counters.add("stored_bytes.disk", result.nbytes)
                self.counters.add("store_seconds.disk", result.seconds)
            else:
                self._report.disk_failed[result.store_id] += 1
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
            rank=self.rank,
            block_fps=tuple(block_fps),
            shape=self.paged.chunk_shape(len(block_fps)),
            namespace_info=self._namespace_info,
        )

    def state(self) -> dict:
        """What a test (or an operator's debugging session) may read about this rank."""
        return {
            "rank": self.rank,
            "disabled": self.disabled,
            "num_slots": self.pool.num_slots if self.pool is not None else 0,
            "slot_bytes": self.pool.slot_bytes if self.pool is not None else 0,
            "pool_bytes": self.pool.nbytes if self.pool is not None else 0,
            "pinned": bool(self.pool is not None and self.pool.pinned),
            "queued_disk_writes": len(self._disk_jobs),
        }

    def shutdown(self) -> None:
        if self.mover is not None:
            for store_id in self.mover.wait_stores():
                spec = self._disk_jobs.pop(store_id, None)
                if spec is not None:
                    self._submit_disk_write(spec)
        if self.disk is not None:
            self.disk.close(self.config.disk_flush_timeout_secs)
        if self.pool is not None:
            self.pool.close()  # unregisters pinned pages (CUDA)


def _first_failed(blocks, errors: set[int]) -> int:
    """Index of the first of ``blocks`` whose load failed, or ``len(blocks)``-like infinity when none did."""
    if errors:
        for i, block in enumerate(blocks):
            if block in errors:
                return i
    return 1 << 62


def _regions(view: torch.Tensor) -> list[memoryview]:
    """Byte views of each region of a ``[R, n, row]`` slot view (each region's rows are contiguous)."""
    return [memoryview(region.numpy()).cast("B") for region in view]


def vllm_rank() -> tuple[int, int]:
    """This worker's (tensor-parallel, pipeline-parallel) rank from vLLM's parallel state."""
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank(), get_pp_group().rank_in_group
    except Exception:  # parallel state not initialised (a single process): rank 0
        return 0, 0
