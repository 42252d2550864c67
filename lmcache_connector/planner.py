"""The scheduler-side core: looks prompts up in the tiers and plans each step's loads and stores.

It imports neither vLLM nor torch: :mod:`lmcache_connector.connector.scheduler` translates vLLM's
requests and scheduler output into the plain :class:`PromptRequest` and :class:`ScheduledRequest`
below (a custom engine can drive it the same way). Per request it keeps the prompt's block
fingerprints and the block ids it was given. Each step:

* ``lookup`` — the longest stored prefix at vLLM-block granularity along the lookup chain (memory,
  then each secondary tier: :mod:`lmcache_connector.tiers.chain`), less what vLLM already has
  locally; at most ``num_tokens - 1`` so one token is left to compute. Fills from secondaries are
  capped by the slots the memory tier can stage. ``None`` (ask again later) while a catalog or an
  asynchronous fill has not answered; asynchronous (vLLM's ``WAITING_FOR_REMOTE_KVS``) when the
  hit needs a fill from a tier whose fills are slow.
* ``after_alloc`` — turns that hit into fills and load specs (slot ranges -> block ids). Every
  memory chunk the load reads is pinned *before* any fill is made, so a fill never evicts a chunk
  the same request is about to load. A chunk found only in a secondary gets a memory slot and a
  fill (read into the slot first), so the next hit is served from memory.
* ``build_plan`` — emits the fills, the loads (synchronous ones for scheduled requests, background
  ones for requests vLLM parks until they finish), and a store for every chunk of prompt blocks
  that this step completes and the memory tier does not hold yet (the final partial chunk too,
  unless ``save_unfull_chunk`` is off). Each new chunk is also written behind its slot to every
  secondary that takes writes; the slot stays pinned until every rank wrote it.
* ``apply_report`` — applies the workers' reports through one ledger per kind of job: a store,
  fill, write or background load is resolved only once *every* rank reported it (done or failed),
  so a slot is never released while a rank may still copy into or write from it.
* ``take_changes`` — with ``track_changes`` on (vLLM's KV-cache events), which chunks each
  announced tier (memory, and every secondary naming an ``event_medium``) started or stopped
  holding; the glue (:mod:`lmcache_connector.connector.kv_events`) turns them into vLLM's events.
  The same changes go, every step, to each catalog that ``watches_holdings`` (the peer tier
  publishes what this instance holds); a reset also tells the workers to stop serving their
  memory slots to peers (``StepPlan.forget_slots``).

Only the prompt is cached (as LMCache does by default): decode tokens vary from request to request.
Requests with prompt embeddings are never cached: their placeholder token ids do not say what the
embeddings were.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

from lmcache_connector.config import LMCacheConfig
from lmcache_connector.counters import Counters
from lmcache_connector.failed_blocks import FailedBlocks, StepAccess
from lmcache_connector.geometry import Geometry
from lmcache_connector.keys import MultimodalItem, block_fingerprints, request_root
from lmcache_connector.ledger import ReportLedger
from lmcache_connector.plan import FAILED_SLOT, AsyncLoad, Fill, LoadSpec, StepPlan, StoreSpec, WorkerReport
from lmcache_connector.tiers.base import PENDING, Catalog, HeldChange, Medium
from lmcache_connector.tiers.chain import Piece, find_pieces
from lmcache_connector.tiers.memory.index import ChunkIndex, ChunkState

logger = logging.getLogger("lmcache_connector")


@dataclass(frozen=True)
class PromptRequest:
    """What the planner needs to know about a request to key and look up its prompt."""

    req_id: str
    prompt_token_ids: list[int] | None  # None: the prompt is embeddings only
    num_tokens: int  # prompt and generated so far
    lora: str | None = None  # the adapter's identity (lmcache_connector.identity.lora_identity)
    cache_salt: str | None = None
    mm_items: tuple[MultimodalItem, ...] = ()
    has_prompt_embeds: bool = False  # embeddings, alone or mixed with token ids: never cached

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids) if self.prompt_token_ids is not None else self.num_tokens


@dataclass(frozen=True)
class ScheduledRequest:
    """One request scheduled in a step: its blocks, what is computed before it, what it computes."""

    req_id: str
    block_ids: list[int]  # all its blocks (replace_blocks) or the ones added this step
    replace_blocks: bool  # a new or resumed request: ``block_ids`` is its whole block table
    num_computed_tokens: int
    num_scheduled_tokens: int


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
    lookup_async: bool = False  # the last lookup's hit needs a fill from an asynchronous tier
    next_chunk: int = 0  # chunks before this one are stored or known to the index


@dataclass
class _Store:
    key: bytes
    req_id: str | None  # the request whose blocks are stored; None for a fill
    chunk: int


@dataclass
class PlannerTotals:
    """Totals since start, never reset (``state()["totals"]``: tests, the demo, debugging). The
    per-step figures that vLLM's stats and ``/metrics`` show are :class:`~lmcache_connector.counters.Counters`,
    which are taken (and reset) every step."""

    lookups: int = 0
    requested_tokens: int = 0
    hit_tokens: int = 0
    stored_chunks: int = 0
    resumed_requests: int = 0  # preempted requests scheduled again
    background_loads: int = 0  # requests whose hit was filled through vLLM's asynchronous-load path
    hit_tokens_by_tier: dict[str, int] = field(default_factory=dict)  # tokens loaded that each tier supplied
    written_chunks_by_tier: dict[str, int] = field(default_factory=dict)  # chunks written behind memory


class Planner:
    def __init__(self, config: LMCacheConfig, geometry: Geometry, media: list[Medium] = ()):
        """``media``: the secondary media (:func:`lmcache_connector.tiers.registry.media`); each one
        the configuration enables joins the lookup chain after memory, in its ``order``."""
        self.config = config
        self.geometry = geometry
        self.index = ChunkIndex(geometry.num_slots, geometry.blocks_per_chunk, geometry.block_bytes)
        self.namespace_digest = geometry.namespace.digest()
        self.totals = PlannerTotals()
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
        self._writes = ReportLedger(world)  # (tier, store id): writes behind memory slots
        self._write_jobs: dict[tuple[str, int], tuple[bytes, tuple[bytes, ...]]] = {}  # -> chunk being written
        self._doomed_writes: set[tuple[str, int]] = set()  # started before a reset: removed when they land
        self._async_loads = ReportLedger(world)  # request id: its background load, on every rank
        self._async_pins: dict[str, list[bytes]] = {}
        self._new_slots: list[int] = []  # slots handed out since the last plan (the worker invalidates them)
        self._building: tuple[StepPlan, list[tuple[str, bytes]]] | None = None
        self.failed_blocks = FailedBlocks(geometry.block_size)
        self.secondaries: list[Catalog] = self._open_secondaries(media)
        self._tiers = {c.name: c for c in self.secondaries}
        # Changes of what the tiers hold: for catalogs that watch them (the peer tier publishes
        # them) and, once track_changes() was called, for the KV-cache events (kept until taken).
        self._watchers = [c for c in self.secondaries if c.watches_holdings]
        self._announcing = False
        self._announced: list[tuple[str, HeldChange]] = []
        self._forget_slots = False  # a reset since the last plan: workers stop serving their slots
        if self._watchers:
            self._track_tiers()

    def _open_secondaries(self, media: list[Medium]) -> list[Catalog]:
        catalogs = [c for c in (m.catalog(self.config, self.geometry) for m in media) if c is not None]
        for catalog in catalogs:
            self.counters.set_gauge(f"capacity_bytes.{catalog.name}", catalog.capacity())
        return sorted(catalogs, key=lambda c: c.order)

    @property
    def disk(self) -> Catalog | None:
        return self._tiers.get("disk")

    def hit_sources(self) -> dict[str, str]:
        """vLLM's hit source (a ``CacheHitSource`` value) for each tier's name."""
        return {"memory": "host", **{c.name: c.hit_source for c in self.secondaries}}

    # ------------------------------------------------------------ lookup

    def lookup(self, request: PromptRequest, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens beyond ``num_computed_tokens`` (vLLM's local hit) the tiers hold, and whether the
        load is asynchronous (a fill from an asynchronous tier); ``None``: ask again later."""
        for catalog in self.secondaries:
            catalog.poll()  # e.g. chunks other engines wrote since the last step
        state = self._state_for(request)
        self.totals.lookups += 1
        self.counters.add("lookups")
        state.lookup, state.lookup_async = [], False
        state.lookup_local_tokens = num_computed_tokens
        if self.disabled or not state.cacheable or not self._may_hit():
            return 0, False
        bs, bpc = self.geometry.block_size, self.geometry.blocks_per_chunk
        for catalog in self.secondaries:
            catalog.prefetch(state.fps, bpc)
        pieces = find_pieces(state.fps, bpc, self.index, self.secondaries, num_computed_tokens // bs)
        if pieces is PENDING:
            return None, False
        hit_blocks = pieces[-1].chunk * bpc + pieces[-1].num_blocks if pieces else 0
        hit_tokens = min(hit_blocks * bs, request.num_tokens - 1)
        state.lookup = pieces
        self.totals.requested_tokens += max(0, request.num_tokens - num_computed_tokens)
        new_tokens = max(0, hit_tokens - num_computed_tokens)
        first = num_computed_tokens // bs
        state.lookup_async = new_tokens > 0 and any(
            self._tiers[p.tier].fills_asynchronously(p.entry)
            for p in pieces
            if p.tier != "memory" and p.chunk * bpc + p.num_blocks > first
        )
        return new_tokens, state.lookup_async

    def _may_hit(self) -> bool:
        """False when no tier can hold anything: lookups then cost nothing."""
        return bool(len(self.index)) or any(len(c) or c.learns_by_asking for c in self.secondaries)

    def _state_for(self, request: PromptRequest) -> _RequestState:
        state = self._requests.get(request.req_id)
        if state is None:
            state = self._new_state(request)
            self._requests[request.req_id] = state
        return state

    def _new_state(self, request: PromptRequest) -> _RequestState:
        tokens = request.prompt_token_ids
        if tokens is None or request.has_prompt_embeds:
            # Prompt embeddings (alone or mixed with token ids): the ids are placeholders, so two
            # prompts with different embeddings would share keys. Never cached.
            return _RequestState(request.req_id, request.num_prompt_tokens, [], cacheable=False)
        root = request_root(self.namespace_digest, request.lora, request.cache_salt)
        fps = block_fingerprints(root, tokens, self.geometry.block_size, request.mm_items)
        return _RequestState(request.req_id, len(tokens), fps, cacheable=True)

    # ------------------------------------------------------------ allocation -> load plan

    def after_alloc(self, req_id: str, num_tokens: int, block_ids: list[int], num_external_tokens: int) -> None:
        """vLLM allocated ``block_ids`` for the request and counts ``num_external_tokens`` as loaded."""
        state = self._requests.get(req_id)
        if state is None:
            if num_external_tokens > 0:
                raise RuntimeError(f"request {req_id} was promised a hit that was never looked up")
            return
        self._release_pending(state)
        state.hit_tokens_by_tier = {}
        self.counters.add("requested_tokens", max(0, num_tokens - state.lookup_local_tokens))
        if num_external_tokens <= 0:
            return
        bs, bpc = self.geometry.block_size, self.geometry.blocks_per_chunk
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
            logger.warning("Request %s: stored chunks no longer cover the promised hit; recomputing", req_id)
            state.pending_loads.append(LoadSpec(FAILED_SLOT, 0, block_ids[covered:end]))
        self.totals.hit_tokens += num_external_tokens
        self.counters.add("hit_tokens", num_external_tokens)
        for tier, tokens in state.hit_tokens_by_tier.items():
            self.counters.add(f"hit_tokens.{tier}", tokens)
        for tier, tokens in state.hit_tokens_by_tier.items():
            self.totals.hit_tokens_by_tier[tier] = self.totals.hit_tokens_by_tier.get(tier, 0) + tokens
        if state.lookup_async:
            self.totals.background_loads += 1
            for fill in state.pending_fills:
                self.index.get(fill.key).filling = True  # loadable only once the background fill is done

    def _load_spec(self, state: _RequestState, piece: Piece, first_block: int, block_ids: list[int]) -> LoadSpec | None:
        key = piece.entry.key
        for catalog in self.secondaries:
            if key in catalog:
                catalog.touch(key)  # recency in every tier follows use, in memory or not
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
            Fill(
                store_id,
                slot,
                state.req_id,
                piece.tier,
                key,
                list(piece.entry.block_fps),
                piece.chunk * self.geometry.blocks_per_chunk,
                list(getattr(piece.entry, "sources", ())),  # where to read it (a peer: its holders)
            )
        )
        return LoadSpec(slot, first_block, block_ids)

    def _new_job(self, job: _Store) -> int:
        store_id = self._next_store_id
        self._next_store_id += 1
        self._store_jobs[store_id] = job
        self._stores.expect(store_id)
        return store_id

    def hit_tokens_by_tier(self, req_id: str) -> dict[str, int]:
        """Tokens of the request's planned load, per tier that supplies them (for vLLM's hit sources)."""
        state = self._requests.get(req_id)
        return dict(state.hit_tokens_by_tier) if state is not None else {}

    def _release_pending(self, state: _RequestState) -> None:
        """Drop a load plan that will not be sent: its fills fail (slots freed), its pins go."""
        for fill in state.pending_fills:
            self._resolve_store(fill.store_id, ok=False)
        self.index.unpin(state.pending_pins)
        state.pending_fills, state.pending_loads, state.pending_pins = [], [], []

    # ------------------------------------------------------------ the step plan

    def build_plan(self, scheduled: list[ScheduledRequest]) -> StepPlan:
        """The step's plan, for the requests vLLM scheduled (new and resumed ones first, as vLLM lists them)."""
        self._step += 1
        for catalog in self.secondaries:
            catalog.poll()
        plan = StepPlan(step=self._step, idle=not scheduled)
        step_pins: list[tuple[str, bytes]] = []
        self._building = (plan, step_pins)  # what abandon_step() releases if this step fails midway
        accesses: list[StepAccess] = []
        for item in scheduled:
            state = self._requests.get(item.req_id)
            if state is None:
                continue
            if item.replace_blocks:
                if state.block_ids:
                    self.totals.resumed_requests += 1
                state.block_ids = list(item.block_ids)
            else:
                state.block_ids.extend(item.block_ids)
            computed_after = item.num_computed_tokens + item.num_scheduled_tokens
            accesses.append(self._access(state, item.num_computed_tokens, computed_after))
            self._plan(plan, step_pins, state, computed_after)

        for req_id, blocks in self.failed_blocks.check_step(accesses).items():
            logger.warning(
                "Request %s would read %d blocks whose load failed earlier; recomputing", req_id, len(blocks)
            )
            plan.loads.setdefault(req_id, []).append(LoadSpec(FAILED_SLOT, 0, blocks))

        # A request whose load runs in the background is not scheduled this step (vLLM parks it in
        # WAITING_FOR_REMOTE_KVS); loads planned for any other request not scheduled after all
        # must not keep their pins.
        for state in self._requests.values():
            if state.pending_loads and state.lookup_async:
                plan.async_loads[state.req_id] = AsyncLoad(state.pending_fills, state.pending_loads)
                self._async_pins[state.req_id] = state.pending_pins
                self._async_loads.expect(state.req_id)
                state.pending_fills, state.pending_loads, state.pending_pins = [], [], []
            elif state.pending_loads or state.pending_fills or state.pending_pins:
                self._release_pending(state)

        if plan.loads:
            self._load_pins[plan.step] = step_pins
            self._load_steps.expect(plan.step)
        plan.new_slots, self._new_slots = self._new_slots, []  # this step's lookups and stores
        plan.forget_slots, self._forget_slots = self._forget_slots, False
        self._building = None
        self._update_gauges()
        self._collect_changes()
        return plan

    def abandon_step(self) -> None:
        """``build_connector_meta`` failed midway: release what this step pinned or prepared."""
        building, self._building = self._building, None
        self._new_slots = []  # released below; the next plan that reuses them lists them again
        if building is not None:
            plan, step_pins = building
            fills = plan.fills + [fill for load in plan.async_loads.values() for fill in load.fills]
            for fill in fills:
                self._resolve_store(fill.store_id, ok=False)
            for specs in plan.stores.values():
                for spec in specs:
                    self._resolve_store(spec.store_id, ok=False)
                    for tier in spec.writes:
                        self._writes.forget((tier, spec.store_id))
                        self.index.unpin([self._write_jobs.pop((tier, spec.store_id))[0]])
            self.index.unpin([key for _, key in step_pins])
            for req_id in plan.async_loads:
                self._async_loads.forget(req_id)
                self.index.unpin(self._async_pins.pop(req_id, []))
        for state in self._requests.values():
            self._release_pending(state)

    def _update_gauges(self) -> None:
        evictions = self.index.stats.evictions
        if evictions != self._evictions_seen:
            self.counters.add("evictions.memory", evictions - self._evictions_seen)
            self._evictions_seen = evictions
        self.counters.set_gauge("usage_bytes.memory", self.index.stored_bytes)
        for catalog in self.secondaries:
            self.counters.set_gauge(f"usage_bytes.{catalog.name}", catalog.usage())
            self.counters.set_gauge(f"capacity_bytes.{catalog.name}", catalog.capacity())
            self.counters.set_gauge(f"tier_up.{catalog.name}", float(catalog.up()))
            for key, amount in catalog.take_counts().items():
                self.counters.add(key, amount)

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
        spec = StoreSpec(
            store_id, slot, state.block_ids[start : start + count], start + count, key=key, block_fps=list(block_fps)
        )
        for catalog in self.secondaries:
            if catalog.accepts_writes() and key not in catalog:
                # The background writers read the slot: keep the chunk pinned until every rank wrote it.
                spec.writes.append(catalog.name)
                self.index.pin([key])
                self._write_jobs[(catalog.name, store_id)] = (key, block_fps)
                self._writes.expect((catalog.name, store_id))
        plan.stores.setdefault(state.req_id, []).append(spec)

    # ------------------------------------------------------------ worker reports

    def apply_report(self, report: Any) -> None:
        """The workers' merged report for a step (``None`` or another object: nothing to apply)."""
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
        for req_id, count in report.async_done.items():
            if self._async_loads.report(req_id, ok=True, count=count) is not None:
                pins = self._async_pins.pop(req_id, [])
                if report.failed_load_slots:
                    self._discard_failed([(req_id, key) for key in pins], report.failed_load_slots)
                self.index.unpin(pins)
        self._apply_write_reports(report)
        if report.worker_disabled and not self.disabled:
            self._disable()
        self._collect_changes()  # what became held is published now, not at the next request's step

    def _resolve_store(self, store_id: int, ok: bool) -> None:
        """Every rank reported a store or fill (or it was never sent): the chunk is READY or gone."""
        self._stores.forget(store_id)
        job = self._store_jobs.pop(store_id, None)
        if job is None:
            return
        self.index.complete_store(job.key, ok=ok)
        if ok:
            self.totals.stored_chunks += job.req_id is not None
            return
        state = self._requests.get(job.req_id) if job.req_id is not None else None
        if state is not None:
            # Stored again once its blocks are computed again (e.g. after vLLM recomputed them).
            state.next_chunk = min(state.next_chunk, job.chunk)

    def _apply_write_reports(self, report: WorkerReport) -> None:
        for name in report.writes_stopped:
            if name in self._tiers:
                self._tiers[name].writes_stopped()
        outcomes = [(job, False, n) for job, n in report.write_failed.items()]
        outcomes += [(job, True, n) for job, n in report.written.items()]
        for job, ok, count in outcomes:
            outcome = self._writes.report(job, ok=ok, count=count)
            if outcome is None:
                continue
            key, block_fps = self._write_jobs.pop(job)
            self.index.unpin([key])
            catalog = self._tiers.get(job[0])
            if catalog is None:
                continue
            if job in self._doomed_writes:  # started before a reset: must not come back
                self._doomed_writes.discard(job)
                catalog.discard(key)  # whatever any rank wrote
            elif outcome:
                catalog.stored(key, block_fps, len(block_fps) * self.geometry.block_bytes * self.geometry.world_size)
                written = self.totals.written_chunks_by_tier
                written[job[0]] = written.get(job[0], 0) + 1
        for name, key in report.gone:
            if name in self._tiers:
                self._tiers[name].forget(key)
        for (name, source), seconds in report.skipped_sources.items():
            if name in self._tiers:
                self._tiers[name].skip_source(source, seconds)

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
        for job in self._writes.jobs():
            self._writes.forget(job)
            self.index.unpin([self._write_jobs.pop(job)[0]])
        for req_id in self._async_loads.jobs():
            self._async_loads.forget(req_id)
            self.index.unpin(self._async_pins.pop(req_id, []))
        for step in self._load_steps.jobs():
            self._load_steps.forget(step)
            self.index.unpin([key for _, key in self._load_pins.pop(step, [])])
        self._load_failed_slots.clear()
        for state in self._requests.values():
            self._release_pending(state)
        self.index.clear()

    # ------------------------------------------------------------ request end

    def request_finished(self, req_id: str) -> None:
        state = self._requests.pop(req_id, None)
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
        for catalog in self.secondaries:
            catalog.clear([key for (name, _), (key, _) in self._write_jobs.items() if name == catalog.name])
        self._doomed_writes.update(self._write_jobs)
        self._forget_slots = True
        self._update_gauges()
        self._collect_changes()
        return True

    # ------------------------------------------------------------ KV-cache events

    def track_changes(self) -> None:
        """Record, from now on, which chunks each announced tier starts and stops holding."""
        self._announcing = True
        self._track_tiers()

    def _track_tiers(self) -> None:
        self.index.track_changes()
        for catalog in self.secondaries:
            if catalog.event_medium is not None:
                catalog.track_changes()

    def event_media(self) -> dict[str, str]:
        """vLLM's KV-event medium of each announced tier (the memory tier is host memory: ``CPU``)."""
        return {"memory": "CPU", **{c.name: c.event_medium for c in self.secondaries if c.event_medium}}

    def take_changes(self) -> list[tuple[str, HeldChange]]:
        """``(tier, change)`` since the last call: per tier in order (empty unless tracked)."""
        self._collect_changes()
        changes, self._announced = self._announced, []
        return changes

    def _collect_changes(self) -> None:
        """Take the tiers' changes once, for the watching catalogs and the KV-cache events."""
        if not (self._watchers or self._announcing):
            return
        changes = []
        for key, held in self.index.take_changes():
            entry = self.index.get(key) if held else None
            changes.append(("memory", HeldChange(key, held, block_fps=entry.block_fps if entry is not None else ())))
        for catalog in self.secondaries:
            if catalog.event_medium is not None:
                changes.extend((catalog.name, change) for change in catalog.take_changes())
        if not changes:
            return
        for watcher in self._watchers:
            watcher.holdings_changed(changes)
        if self._announcing:
            self._announced.extend(changes)

    def shutdown(self) -> None:
        for catalog in self.secondaries:
            catalog.close()

    @property
    def inflight(self) -> int:
        """Stores, fills, writes and loads still waiting for worker reports (0 when idle)."""
        return len(self._stores) + len(self._load_steps) + len(self._writes) + len(self._async_loads)

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
            "totals": copy.deepcopy(vars(self.totals)),
            "disk_chunks": len(self.disk) if self.disk is not None else None,
            "disk_writes_enabled": self.disk is not None and self.disk.accepts_writes(),
            "tiers": {c.name: {"chunks": len(c), "usage_bytes": c.usage(), "up": c.up()} for c in self.secondaries},
        }
