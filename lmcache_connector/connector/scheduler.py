"""The scheduler-side half: looks prompts up in the tiers and plans each step's loads and stores.

Per request it keeps the prompt's block fingerprints and the vLLM block ids it was given. Each step:

* ``get_num_new_matched_tokens`` — the longest stored prefix at vLLM-block granularity (memory
  tier, then disk tier), less what vLLM already has locally; at most ``num_tokens - 1`` so one token
  is left to compute.
* ``update_state_after_alloc`` — turns that hit into load specs (slot ranges -> block ids) and pins
  the chunks they read. A chunk found only on disk gets a memory slot and is read into it first
  (a promotion), so the next hit is served from memory.
* ``build_connector_meta`` — emits the loads, and a store for every chunk of prompt blocks that
  this step completes and the memory tier does not hold yet (the final partial chunk too, unless
  ``save_unfull_chunk`` is off). With a disk tier, each new chunk is also written to disk in the
  background; its memory slot stays pinned until the file is written.
* ``update_connector_output`` — applies the workers' reports: stores confirmed by every worker
  become READY, failed ones free their slot, load steps unpin their chunks, chunks that failed to
  load are forgotten, written files enter the disk catalog, evicted or bad ones leave it.

Only the prompt is cached (as LMCache does by default): decode tokens vary from request to request.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import LMCacheConfig
from ..disk_catalog import DiskCatalog
from ..index import ChunkIndex, ChunkState
from ..keys import MultimodalItem, block_fingerprints, request_root
from ..stats import Counters
from ..tiers.disk_format import rank_tag
from .geometry import Geometry
from .lookup import Piece, find_pieces
from .metadata import DiskRead, DiskWrite, LoadSpec, StepPlan, StoreSpec, WorkerReport

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger("lmcache_connector")

# A load spec with this slot tells the worker to report its blocks as failed: used when the plan
# cannot cover what vLLM was promised, so vLLM recomputes instead of reading stale blocks.
FAILED_SLOT = -1


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
    pending_loads: list[LoadSpec] = field(default_factory=list)
    pending_pins: list[bytes] = field(default_factory=list)
    next_chunk: int = 0  # chunks before this one are stored or known to the index


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
        self._evictions_seen = 0
        self._requests: dict[str, _RequestState] = {}
        self._step = 0
        self._next_store_id = 0
        self._inflight_stores: dict[int, bytes] = {}  # store id -> chunk key
        self._store_reports: Counter = Counter()
        self._load_pins: dict[int, list[tuple[str, bytes]]] = {}  # step -> (request, chunk) its loads read
        self._load_reports: Counter = Counter()
        self._inflight_disk: dict[int, tuple[bytes, tuple[bytes, ...]]] = {}  # store id -> chunk being written
        self._disk_reports: Counter = Counter()
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
        if not state.cacheable or not (len(self.index) or (self.disk is not None and len(self.disk))):
            state.lookup = []
            return 0, False
        bs, bpc = self.geometry.block_size, self.geometry.blocks_per_chunk
        pieces = find_pieces(state.fps, bpc, self.index, self.disk)
        hit_blocks = pieces[-1].chunk * bpc + pieces[-1].num_blocks if pieces else 0
        hit_tokens = min(hit_blocks * bs, request.num_tokens - 1)
        state.lookup = pieces
        state.lookup_local_tokens = num_computed_tokens
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
        if tokens is None:  # prompt embeddings: no token ids to key on
            return _RequestState(request.request_id, request.num_prompt_tokens, [], cacheable=False)
        lora = request.lora_request.lora_name if request.lora_request else None
        root = request_root(self.namespace_digest, lora, request.cache_salt)
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
        covered = first
        for piece in state.lookup:
            lo = max(first, piece.chunk * bpc)
            hi = min(end, piece.chunk * bpc + piece.num_blocks)
            if lo >= hi:
                continue
            if lo != covered:
                break
            spec = self._load_spec(piece, lo - piece.chunk * bpc, block_ids[lo:hi])
            if spec is None:
                break
            state.pending_loads.append(spec)
            state.pending_pins.append(piece.entry.key)
            self.index.pin([piece.entry.key])
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

    def _load_spec(self, piece: Piece, first_block: int, block_ids: list[int]) -> LoadSpec | None:
        key = piece.entry.key
        if self.disk is not None and key in self.disk:
            self.disk.touch(key)  # recency on disk follows use, in memory or not
        in_memory = self.index.get(key)
        if piece.tier == "memory" or in_memory is not None:
            # (A disk chunk another request of this step already promoted is read from its slot.)
            if in_memory is None or in_memory.state is ChunkState.DOOMED:
                return None
            if piece.tier == "memory" and in_memory is not piece.entry:
                return None
            self.index.touch(key)
            return LoadSpec(in_memory.slot, first_block, block_ids)
        # A promotion: stage the chunk from its file into a memory slot, then load from there.
        slot = self.index.prepare_store(key, piece.entry.block_fps)
        if slot is None:
            return None
        store_id = self._new_store_id(key)
        read = DiskRead(key.hex(), [fp.hex() for fp in piece.entry.block_fps], store_id)
        return LoadSpec(slot, first_block, block_ids, disk=read)

    def _new_store_id(self, key: bytes) -> int:
        store_id = self._next_store_id
        self._next_store_id += 1
        self._inflight_stores[store_id] = key
        return store_id

    def hit_tokens_by_tier(self, request: Request) -> dict[str, int]:
        """Tokens of the request's planned load, per tier that supplies them (for vLLM's hit sources)."""
        state = self._requests.get(request.request_id)
        return dict(state.hit_tokens_by_tier) if state is not None else {}

    def _release_pending(self, state: _RequestState) -> None:
        self.index.unpin(state.pending_pins)
        state.pending_loads, state.pending_pins = [], []

    # ------------------------------------------------------------ the step plan

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> StepPlan:
        self._step += 1
        if self.disk is not None:
            self.disk.poll()
        plan = StepPlan(step=self._step)
        step_pins: list[tuple[str, bytes]] = []
        scheduled = scheduler_output.num_scheduled_tokens

        for new_req in scheduler_output.scheduled_new_reqs:
            state = self._requests.get(new_req.req_id)
            if state is None:
                continue
            if state.block_ids:
                self.stats.resumed_requests += 1
            state.block_ids = list(new_req.block_ids[0]) if new_req.block_ids else []
            self._plan(plan, step_pins, state, new_req.num_computed_tokens + scheduled.get(new_req.req_id, 0))

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
            self._plan(plan, step_pins, state, cached.num_computed_tokens[i] + scheduled.get(req_id, 0))

        # Loads planned for requests that were not scheduled after all must not keep their pins.
        for state in self._requests.values():
            if state.pending_loads:
                self._fail_unsent_promotions(state)
                self._release_pending(state)

        if plan.loads:
            self._load_pins[plan.step] = step_pins
        self._update_gauges()
        return plan

    def _fail_unsent_promotions(self, state: _RequestState) -> None:
        for spec in state.pending_loads:
            if spec.disk is not None:
                key = self._inflight_stores.pop(spec.disk.store_id, None)
                if key is not None:
                    self.index.complete_store(key, ok=False)

    def _update_gauges(self) -> None:
        evictions = self.index.stats.evictions
        if evictions != self._evictions_seen:
            self.counters.add("evictions.memory", evictions - self._evictions_seen)
            self._evictions_seen = evictions
        self.counters.set_gauge("usage_bytes.memory", self.index.stored_bytes)
        if self.disk is not None:
            self.counters.set_gauge("usage_bytes.disk", self.disk.used_bytes)

    def _plan(
        self, plan: StepPlan, step_pins: list[tuple[str, bytes]], state: _RequestState, computed_after: int
    ) -> None:
        if state.pending_loads:
            plan.loads[state.req_id] = state.pending_loads
            step_pins.extend((state.req_id, key) for key in state.pending_pins)
            state.pending_loads, state.pending_pins = [], []
        if not state.cacheable:
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
        store_id = self._new_store_id(key)
        spec = StoreSpec(store_id, slot, state.block_ids[start : start + count])
        if self._disk_writes and key not in self.disk:
            # The background writer reads the slot: keep the chunk pinned until the file is written.
            spec.disk = DiskWrite(key.hex(), [fp.hex() for fp in block_fps])
            self.index.pin([key])
            self._inflight_disk[store_id] = (key, block_fps)
        plan.stores.setdefault(state.req_id, []).append(spec)

    # ------------------------------------------------------------ worker reports

    def update_connector_output(self, report: Any) -> None:
        if not isinstance(report, WorkerReport):
            return
        world = self.geometry.world_size
        for store_id in report.failed_stores:
            key = self._inflight_stores.pop(store_id, None)
            self._store_reports.pop(store_id, None)
            if key is not None:
                self.index.complete_store(key, ok=False)
        for store_id, count in report.stored.items():
            if store_id not in self._inflight_stores:
                continue
            self._store_reports[store_id] += count
            if self._store_reports[store_id] >= world:
                del self._store_reports[store_id]
                self.index.complete_store(self._inflight_stores.pop(store_id), ok=True)
                self.stats.stored_chunks += 1
        for step, count in report.load_steps.items():
            self._load_reports[step] += count
            if self._load_reports[step] >= world:
                del self._load_reports[step]
                pins = self._load_pins.pop(step, [])
                if report.failed_load_slots:
                    self._discard_failed(pins, report.failed_load_slots)
                self.index.unpin([key for _, key in pins])
        self._apply_disk_report(report)

    def _apply_disk_report(self, report: WorkerReport) -> None:
        if report.disk_disabled and self._disk_writes:
            self._disk_writes = False  # the worker logged why; loads from disk go on
        for store_id in report.disk_failed:
            written = self._inflight_disk.pop(store_id, None)
            self._disk_reports.pop(store_id, None)
            if written is not None:
                self.index.unpin([written[0]])
        for store_id, count in report.disk_written.items():
            if store_id not in self._inflight_disk:
                continue
            self._disk_reports[store_id] += count
            if self._disk_reports[store_id] >= self.geometry.world_size:
                del self._disk_reports[store_id]
                key, block_fps = self._inflight_disk.pop(store_id)
                self.index.unpin([key])
                if self.disk is not None:
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

    # ------------------------------------------------------------ request end

    def request_finished(self, request: Request) -> None:
        state = self._requests.pop(request.request_id, None)
        if state is not None:
            self._fail_unsent_promotions(state)
            self._release_pending(state)

    def reset_cache(self) -> bool:
        self.index.clear()
        return True

    def shutdown(self) -> None:
        if self.disk is not None:
            self.disk.close()

    @property
    def inflight(self) -> int:
        """Stores, disk writes and load steps still waiting for worker reports (0 when idle)."""
        return len(self._inflight_stores) + len(self._load_pins) + len(self._inflight_disk)
