"""The scheduler-side half: looks prompts up in the index and plans each step's loads and stores.

Per request it keeps the prompt's block fingerprints and the vLLM block ids it was given. Each step:

* ``get_num_new_matched_tokens`` — the longest stored prefix at vLLM-block granularity, less what
  vLLM already has locally; at most ``num_tokens - 1`` so one token is left to compute.
* ``update_state_after_alloc`` — turns that hit into load specs (slot ranges -> block ids) and pins
  the chunks they read.
* ``build_connector_meta`` — emits the loads, and a store for every chunk of prompt blocks that
  this step completes and the index does not hold yet (the final partial chunk too, unless
  ``save_unfull_chunk`` is off).
* ``update_connector_output`` — applies the workers' reports: stores confirmed by every worker
  become READY, failed ones free their slot, load steps unpin their chunks, chunks that failed to
  load are forgotten.

Only the prompt is cached (as LMCache does by default): decode tokens vary from request to request.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import LMCacheConfig
from ..index import ChunkIndex, ChunkPiece
from ..keys import MultimodalItem, block_fingerprints, request_root
from ..stats import Counters
from .geometry import Geometry
from .metadata import LoadSpec, StepPlan, StoreSpec, WorkerReport

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
    lookup: list[ChunkPiece] = field(default_factory=list)
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

    # ------------------------------------------------------------ lookup

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        state = self._state_for(request)
        if not state.cacheable or not len(self.index):
            state.lookup = []
            return 0, False
        bs, bpc = self.geometry.block_size, self.geometry.blocks_per_chunk
        pieces = self.index.lookup(state.fps)
        hit_blocks = pieces[-1].chunk * bpc + pieces[-1].num_blocks if pieces else 0
        hit_tokens = min(hit_blocks * bs, request.num_tokens - 1)
        state.lookup = pieces
        state.lookup_local_tokens = num_computed_tokens
        self.stats.lookups += 1
        self.counters.add("lookups")
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
        end = -(-(state.lookup_local_tokens + num_external_tokens) // bs)
        covered = first
        for piece in state.lookup:
            lo = max(first, piece.chunk * bpc)
            hi = min(end, piece.chunk * bpc + piece.num_blocks)
            if lo >= hi:
                continue
            if lo != covered or self.index.get(piece.entry.key) is not piece.entry:
                break
            state.pending_loads.append(LoadSpec(piece.entry.slot, lo - piece.chunk * bpc, block_ids[lo:hi]))
            state.pending_pins.append(piece.entry.key)
            tokens = min(hi * bs, state.lookup_local_tokens + num_external_tokens) - max(lo * bs, first * bs)
            state.hit_tokens_by_tier["memory"] = state.hit_tokens_by_tier.get("memory", 0) + tokens
            covered = hi
        if covered < end:
            logger.warning(
                "Request %s: stored chunks no longer cover the promised hit; recomputing", request.request_id
            )
            state.pending_loads.append(LoadSpec(FAILED_SLOT, 0, block_ids[covered:end]))
        self.index.pin(state.pending_pins)
        for key in state.pending_pins:
            self.index.touch(key)
        self.stats.hit_tokens += num_external_tokens
        self.counters.add("hit_tokens", num_external_tokens)
        for tier, tokens in state.hit_tokens_by_tier.items():
            self.counters.add(f"hit_tokens.{tier}", tokens)

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
                self._release_pending(state)

        if plan.loads:
            self._load_pins[plan.step] = step_pins
        self._update_gauges()
        return plan

    def _update_gauges(self) -> None:
        evictions = self.index.stats.evictions
        if evictions != self._evictions_seen:
            self.counters.add("evictions.memory", evictions - self._evictions_seen)
            self._evictions_seen = evictions
        self.counters.set_gauge("usage_bytes.memory", self.index.stored_bytes)

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
        store_id = self._next_store_id
        self._next_store_id += 1
        self._inflight_stores[store_id] = key
        plan.stores.setdefault(state.req_id, []).append(
            StoreSpec(store_id, slot, state.block_ids[start : start + count])
        )

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
            self._release_pending(state)

    def reset_cache(self) -> bool:
        self.index.clear()
        return True

    @property
    def inflight(self) -> int:
        """Stores and load steps still waiting for worker reports (0 when idle: nothing leaked)."""
        return len(self._inflight_stores) + len(self._load_pins)
