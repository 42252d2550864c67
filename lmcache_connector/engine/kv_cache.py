"""``KVCache``: the connector's cache behind four calls, for engines that are not vLLM.

It is a second driver of the same vLLM-free core the connector drives (no second implementation
of keys, index or tiers): one :class:`~lmcache_connector.planner.Planner` and one
:class:`~lmcache_connector.executor.Executor` over the API's own paged buffer
(:mod:`lmcache_connector.engine.blocks`), built from the same configuration
(:func:`~lmcache_connector.config.load_config`: ``LMCACHE_*`` and ``LMCACHE_CONFIG_FILE``) and
the same media (:func:`~lmcache_connector.tiers.registry.media`). Each call is one request and
one step, driven the way the connector drives them for vLLM:

* ``lookup`` — the planner's lookup, asked again while a tier has not answered yet (a remote
  catalog's question in flight), for at most ``LMCACHE_BLOCKING_TIMEOUT_SECS``;
* ``store`` — lookup, a plan that computes the whole prompt, the caller's K/V copied into only
  the blocks of chunks the plan stores, then the executor's store and the writes behind it;
* ``retrieve`` — lookup, the load planned into the buffer's blocks (fills from disk or remote
  run synchronously or in the background, as the configuration says; either way the call waits
  for them, each bounded by the tier's own timeout), then the loaded prefix copied out. A block
  whose load failed (a corrupt or vanished file, a remote timeout) ends the prefix there: the
  answer is shorter, or ``None``, never wrong KV.

Background writes (disk, remote) complete between calls; their reports are applied at the start
of the next call, and ``close`` waits for them (``LMCACHE_DISK_FLUSH_TIMEOUT_SECS``). Calls are
serialized by a lock: one request at a time.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lmcache_connector.config import LMCacheConfig, describe, load_config
from lmcache_connector.engine.blocks import PagedBuffer
from lmcache_connector.engine.hf import as_dtype, dynamic_cache, kv_pairs, model_shape
from lmcache_connector.engine.shape import BLOCK_SIZE, KVShape, engine_geometry, engine_namespace
from lmcache_connector.executor import Executor
from lmcache_connector.geometry import Geometry
from lmcache_connector.logs import configure_logging
from lmcache_connector.plan import StepPlan, WorkerReport
from lmcache_connector.planner import Planner, PromptRequest, ScheduledRequest
from lmcache_connector.tiers.registry import media

logger = logging.getLogger("lmcache_connector")

LOOKUP_RETRY_S = 0.001  # between two lookups while a tier's answer is pending
STORE_POLL_S = 0.0002  # between two polls of a GPU's copies into the memory tier


class KVCache:
    """Store and retrieve the KV of token prefixes through the configured tiers.

    Build it with :meth:`from_env` (the model's shape given) or :meth:`for_model` (read from a
    ``transformers`` model or config); use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        config: LMCacheConfig,
        shape: KVShape,
        geometry: Geometry,
        device: torch.device | str = "cpu",
    ):
        self.config = config
        self.shape = shape
        self.geometry = geometry
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._closed = False
        tiers = media(config.extra_tiers)
        self.planner = Planner(config, geometry, tiers)
        try:
            self.executor = Executor(config, geometry, (0, 0), tiers)
            self.buffer = PagedBuffer(shape, geometry.blocks_per_chunk, torch.device(device))
            self.executor.register_kv_caches(self.buffer.layer_views())
        except BaseException:
            self.planner.shutdown()
            raise
        self._log_start()

    @classmethod
    def from_env(
        cls,
        model: str,
        num_layers: int,
        num_kv_heads: int,
        head_size: int,
        dtype: torch.dtype | str,
        env: Mapping[str, str] | None = None,
        device: torch.device | str = "cpu",
        revision: str | None = None,
    ) -> KVCache:
        """The cache for KV of this shape, configured from ``env`` (default ``os.environ``) exactly as
        the vLLM connector is: ``LMCACHE_*`` variables and ``LMCACHE_CONFIG_FILE``.

        ``model`` (a Hub id or a local path, with ``revision``) names the weights in the keys, as
        vLLM's model argument does; ``LMCACHE_MODEL_NAME`` replaces it. ``device`` is where the
        API's own block buffer lives (``"cuda"``: block copies on the GPU); K/V may come from and go
        to any device either way.
        """
        config = load_config(os.environ if env is None else env)
        configure_logging(config.log_level)
        shape = KVShape(num_layers, num_kv_heads, head_size, as_dtype(dtype))
        geometry = engine_geometry(shape, config, engine_namespace(shape, config, model, revision))
        return cls(config, shape, geometry, device)

    @classmethod
    def for_model(
        cls,
        model_or_config: Any,
        env: Mapping[str, str] | None = None,
        model: str | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        """:meth:`from_env` with the shape read from a ``transformers`` model or config: its layers,
        KV heads, head size, dtype (a loaded model's own) and name or path (``model=`` overrides it;
        a model built in memory has none, so it needs ``model=`` or ``LMCACHE_MODEL_NAME``)."""
        shape, name = model_shape(model_or_config, dtype)
        return cls.from_env(
            model if model is not None else name,
            shape.num_layers,
            shape.num_kv_heads,
            shape.head_size,
            shape.dtype,
            env=env,
            device=device,
        )

    # ------------------------------------------------------------ the API

    def lookup(self, tokens: Any) -> int:
        """How many leading tokens of ``tokens`` the tiers hold: whole blocks of :data:`BLOCK_SIZE`
        tokens, up to the last chunk stored (a partial last chunk is stored when
        ``LMCACHE_SAVE_UNFULL_CHUNK`` is on). Loads nothing."""
        ids = token_list(tokens)
        with self._lock:
            self._check_open()
            self._apply(self.executor.take_report())
            request = self._request(ids)
            try:
                hit, _ = self._lookup(request)
            finally:
                self.planner.request_finished(request.req_id)
            return hit

    def store(self, tokens: Any, kv: Any) -> int:
        """Store the chunks of ``tokens`` the memory tier does not hold yet, from ``kv``: per layer
        ``(K, V)`` of ``[1, num_kv_heads, len(tokens), head_size]`` (or without the batch axis), on
        any device, or a ``transformers`` ``DynamicCache``. Returns the tokens newly stored (0 when
        every chunk was held already; a trailing partial block is never stored) once the memory tier
        holds them; disk and remote copies are written behind it, in the background."""
        ids = token_list(tokens)
        layers = self.shape.check_layers(kv_pairs(kv), len(ids))
        with self._lock:
            self._check_open()
            self._apply(self.executor.take_report())
            num_blocks = len(ids) // BLOCK_SIZE
            request = self._request(ids, num_tokens=len(ids))
            try:
                self.planner.lookup(request, 0)  # the planner learns the prompt's fingerprints here
                if num_blocks == 0:
                    return 0
                self._ensure_blocks(num_blocks)
                block_ids = list(range(num_blocks))
                self.planner.after_alloc(request.req_id, len(ids), block_ids, 0)
                plan = self._plan([ScheduledRequest(request.req_id, block_ids, True, 0, len(ids))])
                specs = plan.stores.get(request.req_id, [])
                for spec in specs:
                    self.buffer.write(layers, spec.block_ids[0], len(spec.block_ids))
                failed = self._wait_stored({spec.store_id for spec in specs}, self._run(plan))
            finally:
                self.planner.request_finished(request.req_id)
            return sum(len(s.block_ids) for s in specs if s.store_id not in failed) * BLOCK_SIZE

    def retrieve(
        self,
        tokens: Any,
        device: torch.device | str | None = None,
        out: Any = None,
        as_cache: bool = False,
    ) -> tuple[int, Any] | None:
        """The longest stored prefix of ``tokens``: ``(num_tokens, kv)``, or ``None`` when nothing
        usable is stored.

        ``kv`` is per layer ``(K, V)`` of ``[1, num_kv_heads, num_tokens, head_size]`` on ``device``
        (default: the buffer's device), a ``DynamicCache`` with ``as_cache=True``, or ``out``
        itself: caller-provided per-layer ``(K, V)`` whose token axis holds at least
        ``len(tokens)``; their first ``num_tokens`` positions are written, the rest left as they are.

        ``num_tokens`` may be all of ``tokens``; a caller that goes on generating needs logits,
        so it retrieves ``tokens[:-1]`` (or crops) and runs the model on the rest.
        """
        ids = token_list(tokens)
        targets = self.shape.check_layers_out(kv_pairs(out), len(ids)) if out is not None else None
        with self._lock:
            self._check_open()
            self._apply(self.executor.take_report())
            num_blocks = self._load(ids)
            if num_blocks == 0:
                return None
            if targets is not None:
                self.buffer.read_into(num_blocks, targets)
                return num_blocks * BLOCK_SIZE, out
            pairs = self.buffer.read(num_blocks, torch.device(device) if device is not None else self.buffer.device)
        return num_blocks * BLOCK_SIZE, (dynamic_cache(pairs) if as_cache else pairs)

    def close(self) -> None:
        """Wait for background writes (at most ``LMCACHE_DISK_FLUSH_TIMEOUT_SECS`` per tier), then
        release the tiers. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self.executor.flush_writes(self.config.disk_flush_timeout_secs)
                self._apply(self.executor.take_report())
            finally:
                self.executor.shutdown()
                self.planner.shutdown()

    def __enter__(self) -> KVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state(self) -> dict[str, Any]:
        """The two halves' bookkeeping (slots, pins, totals per tier), for tests and debugging."""
        with self._lock:
            self._apply(self.executor.take_report())
            return {"planner": self.planner.state(), "executor": self.executor.state()}

    # ------------------------------------------------------------ one request, one step

    def _request(self, ids: list[int], num_tokens: int | None = None) -> PromptRequest:
        # One more token than the prompt by default: the planner leaves a request's last token to
        # compute, and the API answers for every token given (the caller decides what to compute).
        n = len(ids) + 1 if num_tokens is None else num_tokens
        return PromptRequest(req_id=f"engine-{next(self._ids)}", prompt_token_ids=ids, num_tokens=n)

    def _lookup(self, request: PromptRequest) -> tuple[int, bool]:
        deadline = time.monotonic() + self.config.blocking_timeout_secs
        while True:
            hit, load_async = self.planner.lookup(request, 0)
            if hit is not None:
                return hit, load_async
            if time.monotonic() > deadline:
                logger.warning("lmcache_connector engine API: a tier did not answer a lookup in time; a miss")
                return 0, False
            time.sleep(LOOKUP_RETRY_S)

    def _load(self, ids: list[int]) -> int:
        """Load the longest stored prefix of ``ids`` into buffer blocks ``0..n``; returns ``n``."""
        request = self._request(ids)
        req_id = request.req_id
        try:
            hit, load_async = self._lookup(request)
            if hit <= 0:
                return 0
            num_blocks = hit // BLOCK_SIZE
            self._ensure_blocks(num_blocks)
            block_ids = list(range(num_blocks))
            self.planner.after_alloc(req_id, request.num_tokens, block_ids, hit)
            self.executor.take_load_errors()  # errors of earlier calls are not this load's
            if load_async:  # vLLM would park the request: schedule nothing, wait for the background load
                self._run(self._plan([]))
                finished = self._wait_background(req_id)
                self._apply(self.executor.take_report())
            else:
                self._run(self._plan([ScheduledRequest(req_id, block_ids, True, hit, 0)]))
                finished = True
            failed = self.executor.take_load_errors()
        finally:
            self.planner.request_finished(req_id)
        if not finished:
            return 0
        return next((i for i in block_ids if i in failed), num_blocks)

    def _wait_stored(self, store_ids: set[int], report: WorkerReport) -> set[int]:
        """Wait until the memory tier holds (or failed) each store, so a retrieve right after a store
        finds it. On CPU the copies are done already; on a GPU they finish in the background. Returns
        the failed ones."""
        failed = set()
        while True:
            failed |= store_ids & set(report.failed_stores)
            store_ids -= set(report.stored) | set(report.failed_stores)
            if not store_ids:
                return failed
            time.sleep(STORE_POLL_S)
            report = self.executor.take_report() or WorkerReport()
            self._apply(report)

    def _wait_background(self, req_id: str) -> bool:
        """Wait for the request's background load (its fills are bounded by their tiers' timeouts).
        Its blocks are copied on this thread, so no late copy can overwrite a later call's blocks."""
        while True:
            if req_id in self.executor.finished_loads():  # waits up to 10 ms for a fill to finish
                return True
            if not self.executor.state()["background_loads"]:
                logger.error("lmcache_connector engine API: a background load vanished; a miss")
                return False

    def _plan(self, scheduled: list[ScheduledRequest]) -> StepPlan:
        try:
            return self.planner.build_plan(scheduled)
        except Exception:
            self.planner.abandon_step()
            raise

    def _run(self, plan: StepPlan) -> WorkerReport:
        """One step of the executor (no forward: the caller computed or will compute the KV)."""
        try:
            self.executor.start_load_kv(plan)
        except Exception:
            logger.exception("lmcache_connector engine API: loading failed; those blocks are a miss")
            self.executor.abort_loads(plan)
        try:
            self.executor.wait_for_save(plan)
        except Exception:
            logger.exception("lmcache_connector engine API: storing failed; those chunks are not stored")
            self.executor.abort_stores(plan)
        report = self.executor.take_report() or WorkerReport()
        self._apply(report)
        return report

    def _apply(self, report: WorkerReport | None) -> None:
        if report is not None:
            self.planner.apply_report(report)

    def _ensure_blocks(self, num_blocks: int) -> None:
        """Grow the buffer (doubling, whole chunks) to hold ``num_blocks`` blocks."""
        if num_blocks <= self.buffer.num_blocks:
            return
        bpc = self.geometry.blocks_per_chunk
        size = max(num_blocks, 2 * self.buffer.num_blocks)
        buffer = PagedBuffer(self.shape, -(-size // bpc) * bpc, self.buffer.device)
        self.executor.replace_kv_caches(buffer.layer_views())
        self.buffer = buffer

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this KVCache is closed")

    def _log_start(self) -> None:
        g = self.geometry
        logger.info("lmcache_connector engine API: %s; %s", describe(self.config), g.summary())
        for tier in self.config.unavailable_tiers():
            logger.warning("lmcache_connector: %s is not available in this version; running without it", tier)
        if g.num_slots == 0:
            logger.warning(
                "lmcache_connector engine API: the memory tier holds no chunk (LMCACHE_LOCAL_CPU off or "
                "LMCACHE_MAX_LOCAL_CPU_SIZE too small): nothing will be stored or retrieved"
            )


def token_list(tokens: Any) -> list[int]:
    """Token ids as a list of ints, from a list, a 1-D tensor or array, or a ``[1, T]`` batch of one."""
    if hasattr(tokens, "tolist"):
        tokens = tokens.tolist()
    if isinstance(tokens, Sequence) and tokens and isinstance(tokens[0], Sequence):
        if len(tokens) != 1:
            raise ValueError(f"tokens is a batch of {len(tokens)} sequences: one sequence per call")
        tokens = tokens[0]
    if not isinstance(tokens, Sequence) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise ValueError("tokens: expected token ids (a list of ints, a 1-D tensor, or a [1, T] tensor)")
    return list(tokens)
