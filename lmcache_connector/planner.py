"""The scheduler-side half: looks prompts up in the tiers and plans each step's loads and stores.

Per request it keeps the prompt's block fingerprints and the vLLM block ids it was given. Each step:

* ``get_num_new_matched_tokens`` — the longest stored prefix at vLLM-block granularity (memory
  tier, then disk tier), less what vLLM already has locally; at most ``num_tokens - 1`` so one token
  is left to compute. Promotions from disk are capped by the slots the memory tier can stage.
* ``update_state_after_alloc`` — turns that hit into load specs (slot ranges -> block ids). Every
  memory chunk the load reads is pinned *before* any promotion is made, so a promotion never
  evicts a chunk the same request is about to load. A chunk found only on disk gets a memory slot
  and a fill (read into the slot first), so the next hit is served from memory.
* ``build_connector_meta`` — emits the fills, the loads, and a store for every chunk of prompt
  blocks that this step completes and the memory tier does not hold yet (the final partial chunk
  too, unless ``save_unfull_chunk`` is off). With a disk tier, each new chunk is also written to
  disk in the background; its memory slot stays pinned until every rank wrote its file.
* ``update_connector_output`` — applies the workers' reports through one ledger per kind of job:
  a store, fill or disk write is resolved only once *every* rank reported it (done or failed), so a
  slot is never released while a rank may still copy into or write from it.

Only the prompt is cached (as LMCache does by default): decode tokens vary from request to request.
Requests with prompt embeddings are never cached: their placeholder token ids do not say what the
embeddings were.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lmcache_connector.config import LMCacheConfig
from lmcache_connector.connector.geometry import Geometry
from lmcache_connector.counters import Counters
from lmcache_connector.failed_blocks import FailedBlocks, StepAccess
from lmcache_connector.identity import lora_identity
from lmcache_connector.keys import MultimodalItem, block_fingerprints, request_root
from lmcache_connector.ledger import ReportLedger
from lmcache_connector.plan import FAILED_SLOT, DiskWrite, Fill, LoadSpec, StepPlan, StoreSpec, WorkerReport
from lmcache_connector.tiers.chain import Piece, find_pieces
from lmcache_connector.tiers.disk.catalog import DiskCatalog
from lmcache_connector.tiers.disk.format import rank_tag
from lmcache_connector.tiers.memory.index import ChunkIndex, ChunkState

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger("lmcache_connector")


@dataclass
class _RequestState:
    req_id: str
    prompt_len: int
    fps: list[bytes]  # one per whole prompt block
    cacheable: bool
    block_ids: list[int] = field(default_factory=list)
    lookup: list[Piece] = field(default_factory=list)
    lookup_local_tokens: int = 0
    hit_tokens_by_tier: dict[str, int] = field(default_factory=dict)  # the last load's tokens per tier
    pending_fills: list[Fill] = field(default_factory=list)
    pending_loads: list[LoadSpec] = field(default_factory=list)
    pending_pins: list[bytes] = field(default_factory=list)
    next_chunk: int = 0  # chunks before this one are stored or known to the index


@dataclass
class _Store:
    key: bytes
    req_id: str | None  # the request whose blocks are stored; None for a fill
    chunk: int


@dataclass
class SchedulerStats:
    lookups: int = 0
    requested_tokens: int = 0
    hit_tokens: int = 0
    stored_chunks: int = 0
    resumed_requests: int = 0  # preempted requests scheduled again
    disk_hit_tokens: int = 0
    disk_written_chunks: int = 0


class SchedulerSide:
    def __init__(self, config: LMCacheConfig, geometry: Geometry):
        self.config = config
        self.geometry = geometry
        self.index = ChunkIndex(geometry.num_slots, geometry.blocks_per_chunk, geometry.block_bytes)
        self.namespace_digest = geometry.namespace.digest()
        self.stats = SchedulerStats()
        self.counters = Counters()
        self.counters.set_gauge("capacity_bytes.memory", geometry.num_slots * geometry.slot_bytes)
        self.disabled = False  # a worker cannot move bytes: no more matching or storing
        self._evictions_seen = 0
        self._requests: dict[str, _RequestState] = {}
        self._step = 0
        self._next_store_id = 0
        world = geometry.world_size
        self._stores = ReportLedger(world)  # stores and fills into memory slots
        self._store_jobs: dict[int, _Store] = {}
        self._load_steps = ReportLedger(world)
        self._load_pins: dict[int, list[tuple[str, bytes]]] = {}  # step -> (request, chunk) its loads read
        self._load_failed_slots: dict[int, set[int]] = {}
        self._disk_writes_ledger = ReportLedger(world)
        self._disk_jobs: dict[int, tuple[bytes, tuple[bytes, ...]]] = {}  # store id -> chunk being written
        self._disk_doomed: set[int] = set()  # disk writes started before a reset: deleted when they land
        self._new_slots: list[int] = []  # slots handed out since the last plan (the worker invalidates them)
        self._building: tuple[StepPlan, list[tuple[str, bytes]]] | None = None
        self.failed_blocks = FailedBlocks(geometry.block_size)
        self.disk: DiskCatalog | None = self._open_disk()
        self._disk_writes = self.disk is not None

    def _open_disk(self) -> DiskCatalog | None:
        if not self.config.local_disk:
            return None
        ns = self.geometry.namespace
        tags = [rank_tag(tp, pp) for tp in range(ns.tp_size) for pp in range(ns.pp_size)]
        try:
            catalog = DiskCatalog(
                self.config.local_disk, self.namespace_digest.hex(), tags, self.config.disk_rescan_interval_secs
            )
        except OSError as exc:
            logger.warning(
                "lmcache_connector: disk tier %s unusable (%s); running without it", self.config.local_disk, exc
            )
            return None
        self.counters.set_gauge("capacity_bytes.disk", self.config.max_local_disk_bytes)
        logger.info(
            "lmcache_connector: disk tier %s holds %d chunks of this model", self.config.local_disk, len(catalog)
        )
        return catalog

    # ------------------------------------------------------------ lookup

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        if self.disk is not None:
            self.disk.poll()  # chunks other engines wrote since the last step
        state = self._state_for(request)
        self.stats.lookups += 1
        self.counters.add("lookups")
        state.lookup = []
        state.lookup_local_tokens = num_computed_tokens
        if self.disabled or not state.cacheable or not (len(self.index) or (self.disk is not None and len(self.disk))):
            return 0, False
        bs, bpc = self.geometry.block_size, self.geometry.blocks_per_chunk
        pieces = find_pieces(state.fps, bpc, self.index, self.disk, num_computed_tokens // bs)
        hit_blocks = pieces[-1].chunk * bpc + pieces[-1].num_blocks if pieces else 0
        hit_tokens = min(hit_blocks * bs, request.num_tokens - 1)
        state.lookup = pieces
        self.stats.requested_tokens += max(0, request.num_tokens - num_computed_tokens)
        return max(0, hit_tokens - num_computed_tokens), False

    def _state_for(self, request: Request) -> _RequestState:
        state = self._requests.get(request.request_id)
        if state is None:
            state = self._new_state(request)
            self._requests[request.request_id] = state
        return state

    def _new_state(self, request: Request) -> _RequestState:
        tokens = request.prompt_token_ids
        if tokens is None or getattr(request, "prompt_embeds", None) is not None:
            # Prompt embeddings (alone or mixed with token ids): the ids are placeholders, so two
            # prompts with different embeddings would share keys. Never cached.
            return _RequestState(request.request_id, request.num_prompt_tokens, [], cacheable=False)
        root = request_root(self.namespace_digest, lora_identity(request.lora_request), request.cache_salt)
        mm_items = [
            MultimodalItem(f.identifier, f.mm_position.offset, f.mm_position.length)
            for f in (request.mm_features or ())
        ]
        fps = block_fingerprints(root, tokens, self.geometry.block_size, mm_items)
        return _RequestState(request.request_id, len(tokens), fps, cacheable=True)

    # ------------------------------------------------------------ allocation -> load plan

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        state = self._requests.get(request.request_id)
        if state is None:
            if num_external_tokens > 0:
                raise RuntimeError(f"request {request.request_id} was promised a hit that was never looked up")
            return
        self._release_pending(state)
        state.hit_tokens_by_tier = {}
        self.counters.add("requested_tokens", max(0, request.num_tokens - state.lookup_local_tokens))
        if num_external_tokens <= 0:
            return
        bs, bpc = self.geometry.block_size, self.geometry.blocks_per_chunk
        block_ids = blocks.get_block_ids()[0]
        first = state.lookup_local_tokens // bs
        end_token = state.lookup_local_tokens + num_external_tokens
        end = -(-end_token // bs)

        # The pieces of the lookup this load reads, in prompt order, contiguous from ``first``.
        wanted: list[tuple[Piece, int, int]] = []
        covered = first
        for piece in state.lookup:
            lo = max(first, piece.chunk * bpc)
            hi = min(end, piece.chunk * bpc + piece.num_blocks)
            if lo >= hi:
                continue
            if lo != covered:
                break
            wanted.append((piece, lo, hi))
            covered = hi

        # Pin every chunk already in memory first: the promotions below may evict, never these.
        usable = 0
        for piece, _, _ in wanted:
            entry = self.index.get(piece.entry.key)
            if entry is None or entry.state is ChunkState.DOOMED:
                if piece.tier == "memory":
                    break  # evicted since the lookup: the hit ends here
                continue  # a promotion, made below
            if piece.tier == "memory" and entry is not piece.entry:
                break
            self.index.pin([entry.key])
            state.pending_pins.append(entry.key)
            usable += 1

        covered = first
        for piece, lo, hi in wanted:
            spec = self._load_spec(state, piece, lo - piece.chunk * bpc, block_ids[lo:hi])
            if spec is None:
                break
            state.pending_loads.append(spec)
            tokens = min(hi * bs, end_token) - lo * bs
            state.hit_tokens_by_tier[piece.tier] = state.hit_tokens_by_tier.get(piece.tier, 0) + tokens
            covered = hi
        if covered < end:
            logger.warning(
                "Request %s: stored chunks no longer cover the promised hit; recomputing", request.request_id
            )
            state.pending_loads.append(LoadSpec(FAILED_SLOT, 0, block_ids[covered:end]))
        self.stats.hit_tokens += num_external_tokens
        self.counters.add("hit_tokens", num_external_tokens)
        for tier, tokens in state.hit_tokens_by_tier.items():
            self.counters.add(f"hit_tokens.{tier}", tokens)
        self.stats.disk_hit_tokens += state.hit_tokens_by_tier.get("disk", 0)

    def _load_spec(self, state: _RequestState, piece: Piece, first_block: int, block_ids: list[int]) -> LoadSpec | None:
        key = piece.entry.key
        if self.disk is not None and key in self.disk:
            self.disk.touch(key)  # recency on disk follows use, in memory or not
        in_memory = self.index.get(key)
        if in_memory is not None:
            # Pinned above (in memory at the lookup, or promoted by an earlier request of this step).
            if key not in state.pending_pins:
                if in_memory.state is ChunkState.DOOMED or piece.tier == "memory":
                    return None
                self.index.pin([key])
                state.pending_pins.append(key)
            self.index.touch(key)
            return LoadSpec(in_memory.slot, first_block, block_ids)
        if piece.tier == "memory":
            return None
        # A promotion: fill a memory slot from the chunk's file, then load from there.
        slot = self.index.prepare_store(key, piece.entry.block_fps)
        if slot is None:
            return None
        self._new_slots.append(slot)
        store_id = self._new_job(_Store(key, None, piece.chunk))
        state.pending_fills.append(
            Fill(store_id, slot, state.req_id, key.hex(), [fp.hex() for fp in piece.entry.block_fps])
        )
        return LoadSpec(slot, first_block, block_ids)

    def _new_job(self, job: _Store) -> int:
        store_id = self._next_store_id
        self._next_store_id += 1
        self._store_jobs[store_id] = job
        self._stores.expect(store_id)
        return store_id

    def hit_tokens_by_tier(self, request: Request) -> dict[str, int]:
        """Tokens of the request's planned load, per tier that supplies them (for vLLM's hit sources)."""
        state = self._requests.get(request.request_id)
        return dict(state.hit_tokens_by_tier) if state is not None else {}

    def _release_pending(self, state: _RequestState) -> None:
        """Drop a load plan that will not be sent: its fills fail (slots freed), its pins go."""
        for fill in state.pending_fills:
            self._resolve_store(fill.store_id, ok=False)
        self.index.unpin(state.pending_pins)
        state.pending_fills, state.pending_loads, state.pending_pins = [], [], []

    # ------------------------------------------------------------ the step plan

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> StepPlan:
        self._step += 1
        if self.disk is not None:
            self.disk.poll()
        plan = StepPlan(step=self._step)
        step_pins: list[tuple[str, bytes]] = []
        self._building = (plan, step_pins)  # what abandon_step() releases if this step fails midway
        scheduled = scheduler_output.num_scheduled_tokens
        accesses: list[StepAccess] = []

        for new_req in scheduler_output.scheduled_new_reqs:
            state = self._requests.get(new_req.req_id)
            if state is None:
                continue
            if state.block_ids:
                self.stats.resumed_requests += 1
            state.block_ids = list(new_req.block_ids[0]) if new_req.block_ids else []
            computed = new_req.num_computed_tokens
            accesses.append(self._access(state, computed, computed + scheduled.get(new_req.req_id, 0)))
            self._plan(plan, step_pins, state, computed + scheduled.get(new_req.req_id, 0))

        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                self.stats.resumed_requests += 1
                state.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                state.block_ids.extend(new_ids[0])
            computed = cached.num_computed_tokens[i]
            accesses.append(self._access(state, computed, computed + scheduled.get(req_id, 0)))
            self._plan(plan, step_pins, state, computed + scheduled.get(req_id, 0))

        for req_id, blocks in self.failed_blocks.check_step(accesses).items():
            logger.warning(
                "Request %s would read %d blocks whose load failed earlier; recomputing", req_id, len(blocks)
            )
            plan.loads.setdefault(req_id, []).append(LoadSpec(FAILED_SLOT, 0, blocks))

        # Loads planned for requests that were not scheduled after all must not keep their pins.
        for state in self._requests.values():
            if state.pending_loads or state.pending_fills or state.pending_pins:
                self._release_pending(state)

        if plan.loads:
            self._load_pins[plan.step] = step_pins
            self._load_steps.expect(plan.step)
        plan.new_slots, self._new_slots = self._new_slots, []  # this step's lookups and stores
        self._building = None
        self._update_gauges()
        return plan

    def abandon_step(self) -> None:
        """``build_connector_meta`` failed midway: release what this step pinned or prepared."""
        building, self._building = self._building, None
        self._new_slots = []  # released below; the next plan that reuses them lists them again
        if building is not None:
            plan, step_pins = building
            for fill in plan.fills:
                self._resolve_store(fill.store_id, ok=False)
            for specs in plan.stores.values():
                for spec in specs:
                    self._resolve_store(spec.store_id, ok=False)
                    if spec.store_id in self._disk_jobs:
                        self._disk_writes_ledger.forget(spec.store_id)
                        self.index.unpin([self._disk_jobs.pop(spec.store_id)[0]])
            self.index.unpin([key for _, key in step_pins])
        for state in self._requests.values():
            self._release_pending(state)

    def _update_gauges(self) -> None:
        evictions = self.index.stats.evictions
        if evictions != self._evictions_seen:
            self.counters.add("evictions.memory", evictions - self._evictions_seen)
            self._evictions_seen = evictions
        self.counters.set_gauge("usage_bytes.memory", self.index.stored_bytes)
        if self.disk is not None:
            self.counters.set_gauge("usage_bytes.disk", self.disk.used_bytes)

    def _access(self, state: _RequestState, computed: int, computed_after: int) -> StepAccess:
        # A load planned for this step writes its blocks: only the local prefix is read as it is.
        read_end = state.lookup_local_tokens if state.pending_loads else computed
        return StepAccess(state.req_id, state.block_ids, read_end, computed_after)

    def _plan(
        self, plan: StepPlan, step_pins: list[tuple[str, bytes]], state: _RequestState, computed_after: int
    ) -> None:
        if state.pending_loads:
            plan.fills.extend(state.pending_fills)
            plan.loads[state.req_id] = state.pending_loads
            step_pins.extend((state.req_id, key) for key in state.pending_pins)
            state.pending_fills, state.pending_loads, state.pending_pins = [], [], []
        if not state.cacheable or self.disabled:
            return
        bpc = self.geometry.blocks_per_chunk
        done_blocks = min(computed_after, state.prompt_len) // self.geometry.block_size
        done_blocks = min(done_blocks, len(state.block_ids), len(state.fps))
        prompt_done = computed_after >= state.prompt_len
        while state.next_chunk * bpc < done_blocks:
            start = state.next_chunk * bpc
            count = min(bpc, done_blocks - start)
            if count < bpc and not (prompt_done and self.config.save_unfull_chunk):
                break
            state.next_chunk += 1
            self._plan_store(plan, state, start, count)
        if state.req_id in plan.stores:
            end = max(spec.end_block for spec in plan.stores[state.req_id])
            plan.prefix_blocks[state.req_id] = state.block_ids[:end]

    def _plan_store(self, plan: StepPlan, state: _RequestState, start: int, count: int) -> None:
        block_fps = tuple(state.fps[start : start + count])
        key = block_fps[-1]
        if key in self.index:
            self.index.touch(key)
            return
        slot = self.index.prepare_store(key, block_fps)
        if slot is None:
            self.counters.add("dropped_stores")
            return
        self._new_slots.append(slot)
        store_id = self._new_job(_Store(key, state.req_id, start // self.geometry.blocks_per_chunk))
        spec = StoreSpec(store_id, slot, state.block_ids[start : start + count], end_block=start + count)
        if self._disk_writes and key not in self.disk:
            # The background writers read the slot: keep the chunk pinned until every file is written.
            spec.disk = DiskWrite(key.hex(), [fp.hex() for fp in block_fps])
            self.index.pin([key])
            self._disk_jobs[store_id] = (key, block_fps)
            self._disk_writes_ledger.expect(store_id)
        plan.stores.setdefault(state.req_id, []).append(spec)

    # ------------------------------------------------------------ worker reports

    def update_connector_output(self, report: Any) -> None:
        if not isinstance(report, WorkerReport):
            return
        for store_id, count in report.failed_stores.items():
            outcome = self._stores.report(store_id, ok=False, count=count)
            if outcome is not None:
                self._resolve_store(store_id, outcome)
        for store_id, count in report.stored.items():
            outcome = self._stores.report(store_id, ok=True, count=count)
            if outcome is not None:
                self._resolve_store(store_id, outcome)
        for step, count in report.load_steps.items():
            self._load_failed_slots.setdefault(step, set()).update(report.failed_load_slots)
            if self._load_steps.report(step, ok=True, count=count) is not None:
                pins = self._load_pins.pop(step, [])
                failed_slots = self._load_failed_slots.pop(step, set())
                if failed_slots:
                    self._discard_failed(pins, failed_slots)
                self.index.unpin([key for _, key in pins])
        self._apply_disk_report(report)
        if report.worker_disabled and not self.disabled:
            self._disable()

    def _resolve_store(self, store_id: int, ok: bool) -> None:
        """Every rank reported a store or fill (or it was never sent): the chunk is READY or gone."""
        self._stores.forget(store_id)
        job = self._store_jobs.pop(store_id, None)
        if job is None:
            return
        self.index.complete_store(job.key, ok=ok)
        if ok:
            self.stats.stored_chunks += job.req_id is not None
            return
        state = self._requests.get(job.req_id) if job.req_id is not None else None
        if state is not None:
            # Stored again once its blocks are computed again (e.g. after vLLM recomputed them).
            state.next_chunk = min(state.next_chunk, job.chunk)

    def _apply_disk_report(self, report: WorkerReport) -> None:
        if report.disk_disabled and self._disk_writes:
            self._disk_writes = False  # the worker logged why; loads from disk go on
        outcomes = [(i, False, n) for i, n in report.disk_failed.items()]
        outcomes += [(i, True, n) for i, n in report.disk_written.items()]
        for store_id, ok, count in outcomes:
            outcome = self._disk_writes_ledger.report(store_id, ok=ok, count=count)
            if outcome is None:
                continue
            key, block_fps = self._disk_jobs.pop(store_id)
            self.index.unpin([key])
            if self.disk is None:
                continue
            if store_id in self._disk_doomed:  # started before a reset: must not come back
                self._disk_doomed.discard(store_id)
                self.disk.delete(key)  # whatever any rank wrote; unbans the key once done
            elif outcome:
                nbytes = len(block_fps) * self.geometry.block_bytes * self.geometry.world_size
                self.disk.add(key, block_fps, nbytes)
                self.stats.disk_written_chunks += 1
        if self.disk is not None:
            for key in report.disk_gone:
                self.disk.remove(key)

    def _discard_failed(self, pins: list[tuple[str, bytes]], slots: set[int]) -> None:
        for req_id, key in pins:
            entry = self.index.get(key)
            if entry is None or entry.slot not in slots:
                continue
            logger.warning("Dropping a stored chunk that failed to load (slot %d)", entry.slot)
            self.index.discard(key)
            # vLLM recomputes the request from the failed block: store its chunks again as they
            # are recomputed, so the next request hits again.
            state = self._requests.get(req_id)
            if state is not None:
                state.next_chunk = 0

    def blocks_computed_from(self, failed: set[int]) -> set[int]:
        """``failed`` blocks plus every later block of each request that holds one of them: their
        KV was computed by attention over the failed bytes. They stay known as wrong until rewritten."""
        tainted = set(failed)
        for state in self._requests.values():
            for i, block in enumerate(state.block_ids):
                if block in failed:
                    tainted.update(state.block_ids[i:])
                    break
        self.failed_blocks.add(tainted)
        return tainted

    def _disable(self) -> None:
        """A worker reported it cannot move bytes: nothing it was asked to do will ever complete."""
        logger.warning("lmcache_connector: a worker disabled the cache; no more lookups or stores")
        self.disabled = True
        for store_id in self._stores.jobs():
            self._resolve_store(store_id, ok=False)
        for store_id in self._disk_writes_ledger.jobs():
            self._disk_writes_ledger.forget(store_id)
            key, _ = self._disk_jobs.pop(store_id)
            self.index.unpin([key])
        for step in self._load_steps.jobs():
            self._load_steps.forget(step)
            self.index.unpin([key for _, key in self._load_pins.pop(step, [])])
        self._load_failed_slots.clear()
        for state in self._requests.values():
            self._release_pending(state)
        self.index.clear()

    # ------------------------------------------------------------ request end

    def request_finished(self, request: Request) -> None:
        state = self._requests.pop(request.request_id, None)
        if state is not None:
            self._release_pending(state)

    def reset_cache(self) -> bool:
        """Forget every chunk of this namespace, in memory and on disk (also those still being written).

        Requests already running stop storing: their KV may predate the reset (vLLM resets after a
        weight update). Chunks pinned by a load already planned are removed when it finishes.
        """
        self.index.clear()
        for state in self._requests.values():
            state.cacheable = False
        if self.disk is not None:
            in_flight = [key for key, _ in self._disk_jobs.values()]
            self._disk_doomed.update(self._disk_jobs)
            self.disk.clear(in_flight)
        self._update_gauges()
        return True

    def shutdown(self) -> None:
        if self.disk is not None:
            self.disk.close()

    @property
    def inflight(self) -> int:
        """Stores, disk writes and load steps still waiting for worker reports (0 when idle)."""
        return len(self._stores) + len(self._load_steps) + len(self._disk_writes_ledger)

    def state(self) -> dict[str, Any]:
        """The bookkeeping a test (or an operator debugging a leak) may read."""
        index = self.index
        return {
            "disabled": self.disabled,
            "num_slots": index.num_slots,
            "used_slots": index.used_slots,
            "entries": len(index),
            "stored_bytes": index.stored_bytes,
            "recounted_bytes": index.recount_bytes(),
            "pins": index.pinned,
            "pinned_chunks": [(e.key.hex()[:8], e.state.value, e.pins) for e in index.pinned_entries()],
            "evictions": index.stats.evictions,
            "dropped_stores": index.stats.dropped_stores,
            "inflight": self.inflight,
            "tracked_requests": len(self._requests),
            "stats": vars(self.stats).copy(),
            "disk_chunks": len(self.disk) if self.disk is not None else None,
            "disk_writes_enabled": self._disk_writes,
        }
