"""``LMCacheConnector``: the class vLLM loads through ``kv_connector_module_path``.

vLLM builds one instance per process and role: SCHEDULER in the engine core, WORKER in each worker.
This class only validates configuration, picks the half for its role, and makes sure that no
exception from the cache ever reaches vLLM while serving: a failing lookup is a miss, a failing
plan is an empty plan, a failing load is reported for recompute, a failing store is dropped.
Configuration errors, on the other hand, are raised at start, before any request is served.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from lmcache_connector.config import describe, load_config
from lmcache_connector.connector.idle_steps import IdleSteps
from lmcache_connector.connector.kv_events import KVEventAnnouncer, kv_events_enabled
from lmcache_connector.connector.metrics import LMCacheConnectorStats, build_prom_metrics, build_stats
from lmcache_connector.connector.scheduler import prompt_request, scheduled_requests
from lmcache_connector.connector.vllm_config import compute_geometry
from lmcache_connector.executor import Executor
from lmcache_connector.logs import configure_logging
from lmcache_connector.plan import FAILED_SLOT, LoadSpec, StepPlan
from lmcache_connector.planner import Planner
from lmcache_connector.tiers.registry import media

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger("lmcache_connector")


def _shielded(fallback):
    """Log (once per kind) and swallow an exception from a serving-time hook; return ``fallback()``."""

    def wrap(method):
        @functools.wraps(method)
        def guarded(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except Exception:
                self._report_once(method.__name__)
                return fallback(self, *args, **kwargs)

        return guarded

    return wrap


class LMCacheConnector(KVConnectorBase_V1):
    """Reuses KV caches of repeated prompt prefixes from a CPU-memory tier and a local disk tier."""

    _cache_hit_source = CacheHitSource.HOST

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig,
        worker_rank: tuple[int, int] | None = None,
    ):
        """``worker_rank`` (tensor-parallel, pipeline-parallel) defaults to vLLM's parallel state;
        tests pass it to run several worker ranks in one process."""
        super().__init__(vllm_config, role, kv_cache_config)
        self._reported_errors: set[str] = set()
        # Blocks promised to vLLM this step, per request (kept apart from the scheduler half, so
        # they can still be reported as load errors when that half fails).
        self._asked: dict[str, int] = {}
        self._promised: dict[str, list[int]] = {}
        self._failed_promises: dict[str, list[int]] = {}
        self._fallback_steps = 0
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.config = load_config(os.environ, extra)
        configure_logging(self.config.log_level)
        self.geometry = compute_geometry(vllm_config, kv_cache_config, self.config)
        # vLLM fails a request whose load failed unless told to recompute; a cache miss must never
        # fail a request, so recompute is the default (LMCACHE_LOAD_FAILURE_POLICY=fail opts out).
        self._kv_transfer_config.kv_load_failure_policy = self.config.load_failure_policy

        # The vLLM-free halves this glue drives: one of them per process, by role. Public so that
        # tests and tools read their state() and wrap their movers without reaching into privates.
        self.planner: Planner | None = None
        self.executor: Executor | None = None
        self.events: KVEventAnnouncer | None = None  # only while vLLM publishes KV-cache events
        self.idle_steps = IdleSteps()
        if role == KVConnectorRole.SCHEDULER:
            self.planner = Planner(self.config, self.geometry, media(self.config.extra_tiers))
            if kv_events_enabled(vllm_config):
                self.events = KVEventAnnouncer(vllm_config, self.planner)
            self._log_start()
        else:
            self.executor = Executor(
                self.config, self.geometry, worker_rank or vllm_rank(), media(self.config.extra_tiers)
            )

    def _log_start(self) -> None:
        g = self.geometry
        logger.info("lmcache_connector: %s; %s", describe(self.config), g.summary())
        if self.events is not None:
            logger.info(
                "lmcache_connector: KV-cache events on: announcing %s",
                ", ".join(f"the {tier} tier as {medium}" for tier, medium in self.events.media.items()),
            )
        for tier in self.config.unavailable_tiers():
            logger.warning("lmcache_connector: %s is not available in this version; running without it", tier)
        if g.num_slots == 0:
            logger.warning("lmcache_connector: the memory tier holds no chunk (LMCACHE_MAX_LOCAL_CPU_SIZE too small)")

    def _report_once(self, hook: str) -> None:
        """Log the exception being handled, once per hook."""
        if hook not in self._reported_errors:
            self._reported_errors.add(hook)
            logger.exception("lmcache_connector: %s failed; serving continues without the cache", hook)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped store is a future miss

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: Any = None) -> bool:
        """vLLM 0.33's sleep mode frees and re-creates the KV cache under the worker's byte views of
        it; this connector does not re-register them, so it says no (vLLM then keeps sleep mode off).
        Weight updates are covered by ``reset_cache``, which vLLM calls after them."""
        return False

    def state(self) -> dict[str, Any]:
        """Bookkeeping of this process's half (pins, in-flight jobs, slots), for tests and debugging."""
        half = self.planner or self.executor
        return half.state()

    # ============================================================ statistics (both sides)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> LMCacheConnectorStats:
        return build_stats(data)

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> Any:  # a KVConnectorPromMetrics
        """The ``lmcache_connector_*`` series on vLLM's ``/metrics`` (listed in :mod:`.metrics`)."""
        return build_prom_metrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def get_kv_connector_stats(self) -> LMCacheConnectorStats | None:
        if self.planner is not None:
            data = self.planner.counters.take()
        else:
            data = self.executor.take_counters() if self.executor is not None else {}
        return build_stats(data) if data else None

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[CacheHitSource, int]:
        if num_external_tokens == 0:
            return {}
        sources: dict[CacheHitSource, int] = {}
        try:
            names = self.planner.hit_sources()
            for tier, tokens in self.planner.hit_tokens_by_tier(request.request_id).items():
                source = _hit_source(names.get(tier, "external_unspecified"))
                sources[source] = sources.get(source, 0) + tokens
        except Exception:
            sources = {}
        if sum(sources.values()) != num_external_tokens:
            return {self._cache_hit_source: num_external_tokens}
        return {source: n for source, n in sources.items() if n}

    # ============================================================ scheduler side

    def _miss(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        return 0, False

    @_shielded(_miss)
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        self._asked[request.request_id] = num_computed_tokens
        return self.planner.lookup(prompt_request(request), num_computed_tokens)

    def _remember_promise(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> list[int]:
        """The blocks vLLM now counts as computed because of this connector's answer."""
        if num_external_tokens <= 0:
            self._promised.pop(request.request_id, None)
            return []
        bs = self.geometry.block_size
        local = self._asked.get(request.request_id, 0)
        ids = blocks.get_block_ids()[0][local // bs : -(-(local + num_external_tokens) // bs)]
        self._promised[request.request_id] = list(ids)
        return list(ids)

    def _fail_promise(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        # vLLM counts the promised blocks as computed: report every one as a load error.
        promised = self._promised.get(request.request_id)
        if promised:
            self._failed_promises[request.request_id] = promised

    @_shielded(_fail_promise)
    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self._remember_promise(request, blocks, num_external_tokens)
        if self.events is not None:
            self.events.watch(request)  # its block hashes and tokens, for the chunks it stores
        self.planner.after_alloc(request.request_id, request.num_tokens, blocks.get_block_ids()[0], num_external_tokens)

    def _failed_plan(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        # Nothing of this step's plan is trustworthy: every block promised this step is a load error.
        try:
            self.planner.abandon_step()
        except Exception:
            logger.exception("lmcache_connector: releasing a failed step's pins failed")
        self._fallback_steps -= 1  # distinct from every real step, and from earlier fallbacks
        plan = StepPlan(step=self._fallback_steps)
        for req_id, block_ids in {**self._promised, **self._failed_promises}.items():
            plan.loads[req_id] = [LoadSpec(FAILED_SLOT, 0, block_ids)]
        self._promised.clear()
        self._failed_promises.clear()
        self._asked.clear()
        return plan

    @_shielded(_failed_plan)
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        plan = self.planner.build_plan(scheduled_requests(scheduler_output))
        if self.events is not None:
            try:
                self.events.describe_plan(plan)
            except Exception:  # events are a view for routers: never worth a step's loads
                self._report_once("describe_plan")
        for req_id, block_ids in self._failed_promises.items():
            plan.loads[req_id] = [LoadSpec(FAILED_SLOT, 0, block_ids)]
        self._promised.clear()
        self._failed_promises.clear()
        self._asked.clear()
        return plan

    def _ignore(self, *args: Any, **kwargs: Any) -> None:
        return None

    @_shielded(_ignore)
    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if self.planner is None:
            return
        self.planner.apply_report(connector_output.kv_connector_worker_meta)
        if connector_output.invalid_block_ids:
            self._uncache_failed_blocks(connector_output.invalid_block_ids)

    def _uncache_failed_blocks(self, invalid: set[int]) -> None:
        """Take blocks whose load failed (and every later block of their requests) out of vLLM's
        prefix cache.

        vLLM caches a synchronous load's blocks when it allocates them. Under the ``recompute``
        policy it keeps them cached and counts on the request recomputing them in place; if the
        request is preempted or aborted first, a later request would get the never-written bytes
        (or KV computed over them) as a prefix-cache hit. Under ``fail`` vLLM evicts them itself.
        """
        tainted = self.planner.blocks_computed_from(invalid)
        manager = self._kv_cache_manager
        if manager is not None and self._kv_transfer_config.kv_load_failure_policy == "recompute":
            manager.evict_blocks(tainted)

    def _keep_nothing(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return False, None

    @_shielded(_keep_nothing)
    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._asked.pop(request.request_id, None)
        if self.events is not None:
            self.events.forget(request.request_id)
        if self.planner is not None:
            self.planner.request_finished(request.request_id)
        return False, None

    def _no_pending_work(self) -> bool:
        return False

    @_shielded(_no_pending_work)
    def has_pending_push_work(self) -> bool:
        """vLLM asks this only when no request is left: True keeps its loop running empty steps
        while the workers owe reports of background writes (:mod:`.idle_steps`)."""
        return self.planner is not None and self.idle_steps.wanted(self.planner.inflight)

    def reset_cache(self) -> bool | None:
        return self.planner.reset_cache() if self.planner is not None else None

    def _no_events(self) -> tuple:
        return ()

    @_shielded(_no_events)
    def take_events(self) -> Iterable[KVCacheEvent]:
        """``BlockStored`` / ``BlockRemoved`` for the blocks the tiers hold (:mod:`.kv_events`);
        vLLM publishes them with its own when ``--kv-events-config`` enables events."""
        return self.events.take_events() if self.events is not None else ()

    # ============================================================ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        try:
            self.executor.register_kv_caches(kv_caches)
        except Exception:
            # Without a usable view of the KV cache every load fails (and is recomputed) and
            # nothing is stored; the engine itself keeps serving.
            logger.exception("lmcache_connector: cannot use this KV cache layout; the cache is disabled")

    def _fail_loads(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        plan = self._connector_metadata
        if isinstance(plan, StepPlan):
            self.executor.abort_loads(plan)

    @_shielded(_fail_loads)
    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        plan = self._connector_metadata
        if isinstance(plan, StepPlan):
            self.executor.start_load_kv(plan)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads complete in start_load_kv, before the forward

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return None  # stores copy whole blocks of all layers at once in wait_for_save

    def _fail_stores(self) -> None:
        plan = self._connector_metadata
        if isinstance(plan, StepPlan):
            self.executor.abort_stores(plan)

    @_shielded(_fail_stores)
    def wait_for_save(self) -> None:
        plan = self._connector_metadata
        if isinstance(plan, StepPlan):
            self.executor.wait_for_save(plan)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Background loads (requests in WAITING_FOR_REMOTE_KVS) that finished on this rank, done or
        failed (a failed one's blocks are in this step's load errors)."""
        if self.executor is None:
            return None, None
        try:
            finished = self.executor.finished_loads()
        except Exception:
            logger.exception("lmcache_connector: finishing background loads failed")
            finished = set()
        return None, (finished or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.executor.take_load_errors() if self.executor is not None else set()

    @_shielded(_ignore)
    def build_connector_worker_meta(self):
        return self.executor.take_report() if self.executor is not None else None

    def shutdown(self) -> None:
        if self.executor is not None:
            self.executor.shutdown()
        if self.planner is not None:
            self.planner.shutdown()


def _hit_source(name: str) -> CacheHitSource:
    try:
        return CacheHitSource(name)
    except ValueError:
        return CacheHitSource.EXTERNAL_UNSPECIFIED


def vllm_rank() -> tuple[int, int]:
    """This worker's (tensor-parallel, pipeline-parallel) rank from vLLM's parallel state."""
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank(), get_pp_group().rank_in_group
    except Exception:  # parallel state not initialised (a single process): rank 0
        return 0, 0
