"""The worker-side core: runs each step's plan over the paged KV cache, the memory pool and the
secondary tiers' stores. It imports no vLLM (the connector hands it vLLM's per-layer KV views and
the plan; a custom engine can do the same). One instance per rank:

* ``register_kv_caches`` — views the KV cache as rows of bytes, allocates the pool once, opens each
  configured medium's store. If that fails the worker is *disabled*: it reports so every step, and
  the scheduler stops matching and storing (nothing stays pinned waiting for a worker that will
  never answer).
* ``start_load_kv`` (before the forward) — first invalidates every slot this step hands out, then
  runs the fills (chunks read from a secondary into their slots, verified), then the loads. A slot
  is loadable only once its store or fill has completed, so a load never copies bytes an evicted
  chunk left in the slot. A load that fails is reported through ``take_load_errors`` so vLLM
  recomputes those blocks: wrong KV never reaches attention. Background loads (a request vLLM
  parks in ``WAITING_FOR_REMOTE_KVS``) start their fills on a background thread here.
* ``wait_for_save`` (after the forward) — copies the blocks of each planned store into its slot,
  except stores computed from a block whose load failed in this step (they would hold KV computed
  by attention over wrong bytes); once a store's bytes are complete, its writes to the secondaries
  are queued to their background writers.
* ``finished_loads`` (end of step) — background loads whose fills are done copy their slots into
  the request's blocks on this thread and are reported finished (done or failed).
* ``take_counters`` / ``take_report`` (end of step, in that order, as vLLM calls them) — this step's
  counters, and per job this rank's outcome (done or failed) for the scheduler's ledger; both tell
  of the same finished work.

The worker also keeps a :class:`~lmcache_connector.tiers.memory.slots.SlotTable`: which chunk each
memory slot holds, with per-slot generations. A slot is marked as being overwritten before any
store or fill into it (before a device copy is issued), and as holding its chunk once the bytes
are complete; stores that serve other instances (the peer tier) read slots only through it, so a
chunk evicted while it is copied out is a miss for the peer, never torn bytes.

The worker's rank is a parameter (vLLM's parallel state in production), so tests can run several
ranks in one process.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import torch

from lmcache_connector.config import LMCacheConfig
from lmcache_connector.counters import Counters
from lmcache_connector.geometry import Geometry
from lmcache_connector.keys import rank_tag
from lmcache_connector.ops import PagedKV
from lmcache_connector.ops.mover import make_block_mover
from lmcache_connector.plan import FAILED_SLOT, AsyncLoad, Fill, LoadSpec, StepPlan, StoreSpec, WorkerReport
from lmcache_connector.tiers.base import ChunkMiss, Medium, Store
from lmcache_connector.tiers.memory.pool import MemoryPool
from lmcache_connector.tiers.memory.prefault import populate_in_background
from lmcache_connector.tiers.memory.slots import Shape, SlotTable

logger = logging.getLogger("lmcache_connector")

# A step that computes nothing waits up to this long for a background load instead of returning at
# once: vLLM would otherwise run empty steps back to back, and that spinning takes the CPU from the
# very fill the waiting request needs (on a small machine, several times its TTFT).
IDLE_STEP_WAIT_S = 0.01


class UnfilledSlotError(RuntimeError):
    """A load from a slot that holds no verified chunk (its fill missed): a recompute."""


class Executor:
    def __init__(
        self,
        config: LMCacheConfig,
        geometry: Geometry,
        rank: tuple[int, int] = (0, 0),
        media: list[Medium] = (),
    ):
        self.config = config
        self.geometry = geometry
        self.rank = rank_tag(*rank)
        self.media = list(media)
        self.paged: PagedKV | None = None
        self.pool: MemoryPool | None = None
        self.mover = None
        self.stores: dict[str, Store] = {}
        self._slot_valid: bytearray = bytearray()
        self._report = WorkerReport()
        self._load_errors: set[int] = set()
        self._step_errors: tuple[int, set[int]] = (-1, set())  # (step, blocks whose load failed in it)
        self._filled: dict[int, float] = {}  # slot filled this step -> seconds it took
        self._handled: set[int] = set()  # store/fill ids of the bound step this rank already reported on
        self._write_jobs: dict[int, StoreSpec] = {}  # store id -> store whose writes wait for its bytes
        self._storing: dict[int, StoreSpec] = {}  # store id -> store whose bytes are not complete yet
        self.slots = SlotTable(0, self._copy_slot_out)
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmcache-fill")
        self._readers: ThreadPoolExecutor | None = None  # concurrent reads of one background load
        self._readers_width = 0
        self._idle_step = False  # the current step computes nothing (see finished_loads)
        self._async: dict[str, tuple[AsyncLoad, Future]] = {}  # request id -> its background load
        self.counters = Counters()
        self._gathered = False  # this step's results were gathered with its counters

    @property
    def disabled(self) -> bool:
        return self.mover is None

    @property
    def disk(self):
        """The disk tier's writer, if configured (for tests and the engine harness)."""
        store = self.stores.get("disk")
        return getattr(store, "writer", None)

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
        stores = {}
        for medium in self.media:
            store = medium.store(self.config, self.geometry, self.rank, paged.chunk_shape)
            if store is not None:
                stores[medium.name] = store
        self.paged, self.pool, self.stores = paged, pool, stores
        self._slot_valid = bytearray(num_slots)
        self.slots = SlotTable(
            num_slots, self._copy_slot_out, self._slot_regions if pool.buffer.device.type == "cpu" else None
        )
        self.mover = make_block_mover(paged)
        for store in stores.values():
            store.attach(self.slots, stores)
        if paged.device.type == "cpu":
            # vLLM's CPU KV cache is committed page by page on first write. Loads write whole
            # chunks of blocks at once, so after a start every first hit would pay for those page
            # faults on its time-to-first-token; commit the (already budgeted) cache in the background.
            self._kv_prefault = populate_in_background(paged.storage)
        logger.info(
            "lmcache_connector worker %s: %d KV regions, %d B per block, memory pool %d slots x %.1f MiB%s%s",
            self.rank,
            paged.num_regions,
            paged.block_bytes,
            num_slots,
            slot_bytes / 2**20,
            " (pinned)" if pool.pinned else "",
            "".join(f", {name} tier" for name in stores),
        )

    def replace_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Copy to and from a new KV cache from now on: a custom engine (:mod:`lmcache_connector.engine`)
        grows its own between steps. A block's layout must stay the same (the pool's slots and the
        tiers' chunks keep theirs); only the number of blocks may change. Stores still copying from
        the old cache finish first, and are reported as usual."""
        paged = PagedKV.from_layer_views(kv_caches)
        if self.paged is None or self.disabled:
            raise RuntimeError("replace_kv_caches before a successful register_kv_caches")
        if paged.chunk_shape(1) != self.paged.chunk_shape(1) or paged.device != self.paged.device:
            raise ValueError(
                f"the new KV cache's blocks are {paged.chunk_shape(1)} on {paged.device}, "
                f"not {self.paged.chunk_shape(1)} on {self.paged.device} like the registered one's"
            )
        self._stores_done(self.mover.wait_stores())
        self.paged = paged
        self.mover = make_block_mover(paged)
        if paged.device.type == "cpu":
            self._kv_prefault = populate_in_background(paged.storage)

    # ------------------------------------------------------------ loads

    def start_load_kv(self, plan: StepPlan) -> None:
        self._begin_step(plan)
        if self.pool is not None:
            for specs in plan.stores.values():
                for spec in specs:
                    self.pool.note_used(spec.slot)
        self._run_fills(plan.fills)
        for req_id, specs in plan.loads.items():
            self._run_loads(req_id, specs)
        if plan.loads:
            self._report.load_steps[plan.step] += 1
        for req_id, load in plan.async_loads.items():
            if req_id not in self._async:
                self._async[req_id] = (load, self._background.submit(self._background_fills, load.fills))

    def _run_loads(self, req_id: str, specs: list[LoadSpec]) -> None:
        failed = False
        for spec in specs:
            if failed or spec.slot == FAILED_SLOT or self.disabled:
                self._fail_load(spec.block_ids)
                continue
            started = time.perf_counter()
            try:
                self._load(spec.slot, spec.first_block, spec.block_ids)
            except Exception as exc:  # a failed load is a recompute, never a crash
                # A slot whose fill missed is expected (that miss was logged and counted); anything
                # else is a warning.
                log = logger.info if isinstance(exc, UnfilledSlotError) else logger.warning
                log("Load of %d blocks for request %s failed: %s", len(spec.block_ids), req_id, exc)
                self._fail_load(spec.block_ids)
                self._report.failed_load_slots.add(spec.slot)
                failed = True  # vLLM recomputes from the first failed block: later loads are wasted
                continue
            tier, fill_seconds = self._filled.pop(spec.slot, ("memory", 0.0))
            seconds = time.perf_counter() - started + fill_seconds
            self.counters.add(f"loaded_bytes.{tier}", len(spec.block_ids) * self.paged.block_bytes)
            self.counters.add(f"load_seconds.{tier}", seconds)

    def _begin_step(self, plan: StepPlan) -> None:
        if self._step_errors[0] == plan.step:
            return  # already begun (start_load_kv after a failed attempt)
        self._step_errors = (plan.step, set())
        self._idle_step = plan.idle
        self._filled = {}
        self._handled = set()
        if plan.forget_slots:
            self.slots.forget_all()
            self._storing.clear()  # stores from before the reset: their slots are not served
        # Every slot handed out this step holds nothing loadable until its fill or store completes.
        for slot in plan.new_slots:
            self._invalidate(slot)

    def _invalidate(self, slot: int) -> None:
        if 0 <= slot < len(self._slot_valid):
            self._slot_valid[slot] = 0
            self.slots.overwriting(slot)

    def _slot_regions(self, slot: int, shape: Shape) -> list[memoryview]:
        """The slot's first ``shape[1]`` blocks in place, one view per region (a peer server's thread
        sends them; the slot table confirms afterwards that the slot was not rewritten)."""
        view = self.pool.slot(slot, shape[1])
        return [memoryview(view[region].numpy()).cast("B") for region in range(shape[0])]

    def _copy_slot_out(self, slot: int, shape: Shape, into: memoryview) -> None:
        """The slot's first ``shape[1]`` blocks into ``into``, as ``[regions, blocks, row bytes]``
        (a peer server's thread)."""
        regions, blocks, row = shape
        torch.frombuffer(into, dtype=torch.uint8).view(regions, blocks, row).copy_(self.pool.slot(slot, blocks))

    def _holds(self, slot: int, key: bytes, block_fps) -> None:
        if key and block_fps:
            self.slots.holds(slot, key, block_fps, self.paged.chunk_shape(len(block_fps)))

    def _run_fills(self, fills: list[Fill]) -> None:
        """Fills: read each chunk into its slot; the slot is valid only once verified."""
        failed_requests: set[str] = set()
        for fill in fills:
            if fill.store_id in self._handled:
                continue
            self._handled.add(fill.store_id)
            if fill.req_id in failed_requests:
                # Skipped, not failed: the chunk is still good, so the catalog keeps it.
                self._report.failed_stores[fill.store_id] += 1
                continue
            outcome = self._fill(fill)
            self._record_fill(fill, outcome)
            if outcome[0] != "ok":
                failed_requests.add(fill.req_id)

    def _fill(self, fill: Fill) -> tuple[str, float]:
        """Read one chunk into its slot: ``("ok" | "gone" | "failed", seconds)``. Any thread."""
        store = self.stores.get(fill.tier)
        if store is None or self.disabled:
            return "failed", 0.0
        started = time.perf_counter()
        try:
            self.pool.note_used(fill.slot)
            self.slots.overwriting(fill.slot)
            view = self.pool.slot(fill.slot, len(fill.block_fps))
            if fill.sources:
                store.read_into(fill.key, fill.block_fps, _regions(view), sources=fill.sources)
            else:
                store.read_into(fill.key, fill.block_fps, _regions(view))
        except ChunkMiss as exc:
            # A miss, counted (failed_reads.<tier>); the tier itself warns once per outage or bad peer, so
            # a store that is down does not write a warning per chunk of every request.
            logger.info("Reading chunk %s from the %s tier failed: %s", fill.key.hex()[:12], fill.tier, exc)
            return ("gone" if exc.gone else "failed"), 0.0
        except Exception as exc:
            logger.warning("Reading chunk %s from the %s tier failed: %s", fill.key.hex()[:12], fill.tier, exc)
            return "failed", 0.0
        return "ok", time.perf_counter() - started

    def _record_fill(self, fill: Fill, outcome: tuple[str, float]) -> None:
        """Report a fill's outcome (this thread only)."""
        result, seconds = outcome
        if result == "ok":
            self._slot_valid[fill.slot] = 1
            self._holds(fill.slot, fill.key, fill.block_fps)
            self._filled[fill.slot] = (fill.tier, seconds)
            self._report.stored[fill.store_id] += 1
            return
        if result == "gone":  # missing, corrupt or foreign: the catalog forgets it
            self._report.gone.add((fill.tier, fill.key))
        # The read's own count; the load from this slot then fails and counts failed_loads.
        self.counters.add(f"failed_reads.{fill.tier}")
        self._report.failed_stores[fill.store_id] += 1

    def _background_fills(self, fills: list[Fill]) -> list[tuple[str, float]]:
        """A background load's fills, in order; after the first failure the rest are skipped (vLLM
        recomputes from the first failed block). Where every fill's store allows it
        (``Store.read_concurrency``), up to that many run at once; a fill that already started when
        an earlier one failed still completes, and its chunk is kept in memory."""
        width = min((getattr(self.stores.get(fill.tier), "read_concurrency", 1) for fill in fills), default=1)
        failed = threading.Event()

        def one(fill: Fill) -> tuple[str, float]:
            if failed.is_set():
                return "skipped", 0.0
            outcome = self._fill(fill)
            if outcome[0] != "ok":
                failed.set()
            return outcome

        if width <= 1 or len(fills) <= 1:
            return [one(fill) for fill in fills]
        return list(self._fill_readers(width).map(one, fills))

    def _fill_readers(self, width: int) -> ThreadPoolExecutor:
        """The threads that read one background load's fills at once (the loads themselves run one
        at a time on the background thread, so one pool serves them all)."""
        if self._readers is None or self._readers_width != width:
            if self._readers is not None:
                self._readers.shutdown(wait=False)
            self._readers = ThreadPoolExecutor(max_workers=width, thread_name_prefix="lmcache-fill-read")
            self._readers_width = width
        return self._readers

    def wait_background(self, timeout: float | None = None) -> None:
        """Wait until every background fill submitted so far is done (tests use it for determinism)."""
        for _, future in list(self._async.values()):
            future.exception(timeout)

    def finished_loads(self) -> set[str]:
        """Background loads whose fills are done: copy their slots into the blocks, report them. In a
        step that computes nothing, wait a moment for one to finish (:data:`IDLE_STEP_WAIT_S`)."""
        if self._idle_step and self._async:
            wait([future for _, future in self._async.values()], IDLE_STEP_WAIT_S, return_when=FIRST_COMPLETED)
        finished = set()
        for req_id, (load, future) in list(self._async.items()):
            if not future.done():
                continue
            del self._async[req_id]
            try:
                outcomes = future.result()
            except Exception:
                logger.exception("Background load of request %s failed", req_id)
                outcomes = [("failed", 0.0)] * len(load.fills)
            for fill, outcome in zip(load.fills, outcomes, strict=True):
                if outcome[0] == "skipped":
                    self._report.failed_stores[fill.store_id] += 1
                else:
                    self._record_fill(fill, outcome)
            self._run_loads(req_id, load.loads)
            self._report.async_done[req_id] += 1
            finished.add(req_id)
        return finished

    def _fail_load(self, block_ids: list[int]) -> None:
        self.counters.add("failed_loads")
        self._load_errors.update(block_ids)
        self._step_errors[1].update(block_ids)

    def _load(self, slot: int, first_block: int, block_ids: list[int]) -> None:
        if not 0 <= slot < len(self._slot_valid) or not self._slot_valid[slot]:
            raise UnfilledSlotError(f"slot {slot} holds no stored chunk")
        self.mover.load(self.pool.slot(slot, len(block_ids), first_block), block_ids, slot=slot)

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
        if plan.stores and not self.disabled:
            # Room in the device staging ring for every store of the step, so none waits on PCIe.
            self.mover.prepare_stores(sum(len(specs) for specs in plan.stores.values()), self.pool.slot_bytes)
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
                    view = self.pool.slot(spec.slot, len(spec.block_ids))
                    self.mover.store(spec.block_ids, view, spec.store_id, slot=spec.slot)
                except Exception as exc:  # a failed store is a future miss
                    logger.warning("Store into slot %d failed: %s", spec.slot, exc)
                    self.counters.add("failed_stores.memory")
                    self._fail_store(spec)
                    continue
                self._slot_valid[spec.slot] = 1
                self._storing[spec.store_id] = spec
                self.counters.add("stored_bytes.memory", len(spec.block_ids) * self.paged.block_bytes)
                self.counters.add("store_seconds.memory", time.perf_counter() - started)
                if spec.writes:
                    self._write_jobs[spec.store_id] = spec

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
        for tier in spec.writes:
            self._report.write_failed[(tier, spec.store_id)] += 1

    def take_counters(self) -> dict:
        """This step's counters, for vLLM's stats (:meth:`Counters.take`).

        vLLM takes a step's stats before its report, and an idle engine stops stepping once the last
        report arrived: what the stores finished is gathered here, so each result's counters travel
        in the same step as its report instead of waiting for a next request."""
        self._gather_results()
        self._gathered = True
        return self.counters.take()

    def take_report(self) -> WorkerReport | None:
        if self.disabled:
            self._report.worker_disabled = True
        elif not self._gathered:  # a caller that takes no stats (the custom-engine API)
            self._gather_results()
        self._gathered = False
        report, self._report = self._report, WorkerReport()
        return report if report else None

    def _gather_results(self) -> None:
        """Stores whose bytes completed and writes the secondaries finished since the last call."""
        if not self.disabled:
            self._stores_done(self.mover.poll_stores())
        for name, store in self.stores.items():
            self._collect_write_results(name, store)

    def _stores_done(self, store_ids: list[int]) -> None:
        """Stores whose bytes are complete: report them, and queue their writes behind memory."""
        for store_id in store_ids:
            self._report.stored[store_id] += 1
            stored = self._storing.pop(store_id, None)
            if stored is not None:
                self._holds(stored.slot, stored.key, stored.block_fps)
            spec = self._write_jobs.pop(store_id, None)
            if spec is not None:
                self._submit_writes(spec)

    def _submit_writes(self, spec: StoreSpec) -> None:
        view = self.pool.slot(spec.slot, len(spec.block_ids))
        for tier in spec.writes:
            store = self.stores.get(tier)
            try:
                if store is None:
                    raise RuntimeError(f"the {tier} tier is not open on this worker")
                if spec.event_info and store.keeps_event_info:
                    store.submit_write(
                        spec.store_id, spec.key, spec.block_fps, _regions(view), event_info=spec.event_info
                    )
                else:
                    store.submit_write(spec.store_id, spec.key, spec.block_fps, _regions(view))
            except Exception as exc:  # the write is a future miss; its slot must not stay pinned
                logger.warning("Queueing chunk %s for the %s tier failed: %s", spec.key.hex()[:12], tier, exc)
                self._report.write_failed[(tier, spec.store_id)] += 1

    def _collect_write_results(self, name: str, store: Store) -> None:
        results, gone = store.take_results()
        for result in results:
            if result.ok:
                self._report.written[(name, result.job_id)] += 1
                self.counters.add(f"stored_bytes.{name}", result.nbytes)
                self.counters.add(f"store_seconds.{name}", result.seconds)
            else:
                self._report.write_failed[(name, result.job_id)] += 1
                self.counters.add(f"failed_stores.{name}")
        for key, amount in store.take_counts().items():
            self.counters.add(key, amount)
        self._report.gone.update((name, key) for key in gone)
        if gone:
            self.counters.add(f"evictions.{name}", len(gone))
        if store.writes_stopped():
            self._report.writes_stopped.add(name)
        skipped = self._report.skipped_sources
        for source, seconds in store.take_skipped_sources().items():
            skipped[(name, source)] = max(skipped.get((name, source), 0.0), seconds)

    def state(self) -> dict:
        """What a test (or an operator's debugging session) may read about this rank."""
        return {
            "rank": self.rank,
            "disabled": self.disabled,
            "num_slots": self.pool.num_slots if self.pool is not None else 0,
            "slot_bytes": self.pool.slot_bytes if self.pool is not None else 0,
            "pool_bytes": self.pool.nbytes if self.pool is not None else 0,
            "pinned": bool(self.pool is not None and self.pool.pinned),
            "tiers": sorted(self.stores),
            "queued_writes": len(self._write_jobs),
            "background_loads": len(self._async),
            "totals": self.counters.totals(),
        }

    def flush_writes(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds per tier) until every queued write is done."""
        for store in self.stores.values():
            store.flush(timeout)

    def shutdown(self) -> None:
        if self.mover is not None:
            for store_id in self.mover.wait_stores():
                spec = self._write_jobs.pop(store_id, None)
                if spec is not None:
                    self._submit_writes(spec)
        self._background.shutdown(wait=True, cancel_futures=True)
        if self._readers is not None:
            self._readers.shutdown(wait=True)
        for store in reversed(list(self.stores.values())):  # a store that reads others (the peer tier) first
            store.close(self.config.disk_flush_timeout_secs)
        if self.pool is not None:
            self.pool.close()  # unregisters pinned pages (CUDA)


def _first_failed(blocks, errors: set[int]) -> int:
    """Index of the first of ``blocks`` whose load failed, or a number past any block when none did."""
    if errors:
        for i, block in enumerate(blocks):
            if block in errors:
                return i
    return 1 << 62


def _regions(view: torch.Tensor) -> list[memoryview]:
    """Byte views of each region of a ``[R, n, row]`` slot view (each region's rows are contiguous)."""
    return [memoryview(region.numpy()).cast("B") for region in view]
