"""vLLM-facing statistics: the connector's counters as vLLM's ``KVConnectorStats`` and Prometheus series.

vLLM gathers one ``KVConnectorStats`` per worker each step, merges them with ``aggregate`` and with
the scheduler's, ships only the ``data`` dict to the front end and rebuilds the object there with
the connector's ``build_kv_connector_stats``. The dict's keys are documented in
:mod:`lmcache_connector.counters`. In the front end the dict goes two ways:

* vLLM's periodic stats log sums it over the log interval and prints :meth:`LMCacheConnectorStats.reduce`
  as ``KV Transfer metrics: hit_rate=..., hit_tokens=..., loaded_MiB.memory=...``;
* :class:`LMCacheConnectorPromMetrics` (built by the connector's ``build_prom_metrics``) adds it to
  the Prometheus series below, which vLLM serves on ``/metrics``.

Every series carries vLLM's labels ``model_name`` and ``engine``; those marked *tier* also carry
``tier`` (``memory``, ``disk``, ``peer``, ``remote``). Counters are exposed with prometheus_client's ``_total`` suffix.

==============================================  =======  ====  ================================================
series                                          type     tier  meaning
==============================================  =======  ====  ================================================
``lmcache_connector_requested_tokens_total``    counter        prompt tokens the cache was asked for
``lmcache_connector_hit_tokens_total``          counter        of those, tokens loaded instead of computed
``lmcache_connector_hit_tokens_by_tier_total``  counter  yes   hit tokens by the tier that supplied them
``lmcache_connector_hit_rate``                  gauge          hit / requested tokens since the server started
``lmcache_connector_lookups_total``             counter        prompts looked up in the cache
``lmcache_connector_stored_bytes_total``        counter  yes   bytes of KV written into a tier
``lmcache_connector_store_seconds_total``       counter  yes   time spent writing them
``lmcache_connector_loaded_bytes_total``        counter  yes   KV bytes read from a tier into vLLM's cache
``lmcache_connector_load_seconds_total``        counter  yes   time spent reading them
``lmcache_connector_evictions_total``           counter  yes   chunks evicted to make room
``lmcache_connector_usage_bytes``               gauge    yes   bytes of chunks a tier holds now
``lmcache_connector_capacity_bytes``            gauge    yes   the most a tier may hold
``lmcache_connector_failed_loads_total``        counter        loads that failed (vLLM recomputed the blocks)
``lmcache_connector_failed_reads_total``        counter  yes   chunk reads from a tier that found nothing usable
``lmcache_connector_failed_stores_total``       counter  yes   stores a tier could not complete (a future miss)
``lmcache_connector_dropped_stores_total``      counter        stores skipped because no room could be made
``lmcache_connector_remote_failures_total``     counter        failed calls to a remote store, a peer or the registry
``lmcache_connector_served_chunks_total``       counter  yes   chunks this instance sent to peers (``peer``)
``lmcache_connector_served_bytes_total``        counter  yes   KV bytes of those chunks
``lmcache_connector_dropped_writes_total``      counter  yes   writes a secondary tier dropped (queue full, down)
``lmcache_connector_bad_values_total``          counter  yes   values found that were not the chunk asked for
``lmcache_connector_tier_up``                   gauge    yes   1 while a secondary tier is reachable, 0 when down
==============================================  =======  ====  ================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)
from vllm.v1.metrics.utils import create_metric_per_engine

from lmcache_connector.counters import TIERS, is_gauge, merge

PREFIX = "lmcache_connector_"
MiB = 2**20


# ---------------------------------------------------------------- the stats object vLLM carries


@dataclass
class LMCacheConnectorStats(KVConnectorStats):
    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> LMCacheConnectorStats:
        self.data = merge(self.data, other.data or {})
        return self

    def reduce(self) -> dict[str, int | float]:
        """The summary vLLM logs every interval: hit rate and tokens, MiB moved per tier, any trouble.

        Tiers appear once they moved bytes; failure counts only when they are not zero, so a healthy
        server's line stays short and a failing one says so.
        """
        data = self.data
        requested = data.get("requested_tokens", 0)
        hit = data.get("hit_tokens", 0)
        summary: dict[str, int | float] = {
            "hit_rate": round(hit / requested, 4) if requested else 0.0,
            "hit_tokens": int(hit),
            "requested_tokens": int(requested),
        }
        for tier in _tiers_in(data):
            loaded, stored = data.get(f"loaded_bytes.{tier}", 0), data.get(f"stored_bytes.{tier}", 0)
            if loaded or stored:
                summary[f"loaded_MiB.{tier}"] = round(loaded / MiB, 2)
                summary[f"stored_MiB.{tier}"] = round(stored / MiB, 2)
            if f"usage_bytes.{tier}" in data:
                summary[f"used_MiB.{tier}"] = round(data[f"usage_bytes.{tier}"] / MiB, 1)
        for key in sorted(data):
            if key.partition(".")[0] in _TROUBLE and data[key]:
                summary[key] = int(data[key])
        return summary

    def is_empty(self) -> bool:
        return not self.data


_TROUBLE = (
    "evictions",
    "failed_loads",
    "failed_reads",
    "failed_stores",
    "dropped_stores",
    "remote_failures",
    "dropped_writes",
    "bad_values",
)


def _tiers_in(data: dict[str, Any]) -> list[str]:
    """Known tiers first, in their order, then any tier a newer counter names."""
    named = {key.partition(".")[2] for key in data if "." in key}
    return [t for t in TIERS if t in named] + sorted(named - set(TIERS))


def build_stats(data: dict[str, Any] | None) -> LMCacheConnectorStats:
    return LMCacheConnectorStats(data=dict(data or {}))


# ---------------------------------------------------------------- Prometheus


@dataclass(frozen=True)
class Series:
    """One Prometheus series, fed by the stats key ``key`` (``key.<tier>`` when ``per_tier``)."""

    name: str  # after the prefix
    documentation: str
    key: str = ""  # the stats key; the name when empty
    gauge: bool = False
    per_tier: bool = False

    @property
    def stats_key(self) -> str:
        return self.key or self.name


SERIES = (
    Series(
        "requested_tokens", "Prompt tokens the KV cache was asked for (those vLLM's own prefix cache did not have)."
    ),
    Series("hit_tokens", "Prompt tokens loaded from the KV cache instead of computed."),
    Series("hit_tokens_by_tier", "Hit tokens by the tier that supplied them.", key="hit_tokens", per_tier=True),
    Series("lookups", "Prompts looked up in the KV cache."),
    Series("stored_bytes", "Bytes of KV written into a tier.", per_tier=True),
    Series("store_seconds", "Seconds spent writing KV bytes into a tier.", per_tier=True),
    Series("loaded_bytes", "KV bytes read from a tier into vLLM's KV cache.", per_tier=True),
    Series("load_seconds", "Seconds spent reading KV bytes from a tier.", per_tier=True),
    Series("evictions", "Chunks evicted from a tier to make room.", per_tier=True),
    Series("usage_bytes", "Bytes of KV chunks a tier holds now.", gauge=True, per_tier=True),
    Series("capacity_bytes", "The most bytes of KV chunks a tier may hold.", gauge=True, per_tier=True),
    Series("failed_loads", "Loads that failed; vLLM recomputed those blocks."),
    Series(
        "failed_reads",
        "Chunk reads from a tier into memory that found nothing usable (gone, late, corrupt, foreign, a bad peer).",
        per_tier=True,
    ),
    Series("failed_stores", "Stores a tier could not complete (a future miss).", per_tier=True),
    Series("dropped_stores", "Stores skipped because no room could be made."),
    Series("remote_failures", "Failed calls to a remote store, a peer or the P2P lookup registry."),
    Series("served_chunks", "Chunks this instance's peer servers sent to other instances.", per_tier=True),
    Series("served_bytes", "KV bytes of the chunks sent to other instances.", per_tier=True),
    Series("dropped_writes", "Writes a secondary tier dropped: its queue was full or it was down.", per_tier=True),
    Series("bad_values", "Values found under a valid key that were not the chunk asked for.", per_tier=True),
    Series("tier_up", "1 while a secondary tier is reachable, 0 while it is down.", gauge=True, per_tier=True),
)

HIT_RATE = Series("hit_rate", "Hit tokens / requested tokens since the server started.", gauge=True)


class LMCacheConnectorPromMetrics(KVConnectorPromMetrics):
    """Registers the series of :data:`SERIES` with the metric classes vLLM hands in, and adds each
    step's stats dict to them (``observe``, called in the front-end process)."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        _unregister_previous()
        self._by_key: dict[tuple[str, bool], PromMetric] = {}
        for series in SERIES:
            self._by_key[series.stats_key, series.per_tier] = self._register(series)
        # (engine, stats key) -> the labelled child; tier children are made on first use, and made
        # up front for the known tiers so dashboards see zeros instead of gaps.
        self._children: dict[tuple[int, str], PromMetric] = {}
        for engine, labelvalues in per_engine_labelvalues.items():
            for (key, per_tier), metric in self._by_key.items():
                if per_tier:
                    for tier in TIERS:
                        self._children[engine, f"{key}.{tier}"] = metric.labels(*labelvalues, tier)
                else:
                    self._children[engine, key] = metric.labels(*labelvalues)
        self._hit_rate = create_metric_per_engine(self._register(HIT_RATE), per_engine_labelvalues)
        self._totals = {engine: [0.0, 0.0] for engine in per_engine_labelvalues}  # requested, hit

    def _register(self, series: Series) -> PromMetric:
        labelnames = self._labelnames + (["tier"] if series.per_tier else [])
        name, doc = PREFIX + series.name, series.documentation
        if series.gauge:
            # "mostrecent": with several API-server processes, the latest value is the truth.
            metric = self._gauge_cls(
                name=name, documentation=doc, labelnames=labelnames, multiprocess_mode="mostrecent"
            )
        else:
            metric = self._counter_cls(name=name, documentation=doc, labelnames=labelnames)
        _registered.append(metric)
        return metric

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, value in transfer_stats_data.items():
            child = self._children.get((engine_idx, key)) or self._child_for_new(key, engine_idx)
            if child is None:
                continue
            if is_gauge(key):
                child.set(value)
            elif value > 0:
                child.inc(value)
        totals = self._totals.setdefault(engine_idx, [0.0, 0.0])
        totals[0] += transfer_stats_data.get("requested_tokens", 0)
        totals[1] += transfer_stats_data.get("hit_tokens", 0)
        if totals[0] and engine_idx in self._hit_rate:
            self._hit_rate[engine_idx].set(totals[1] / totals[0])

    def _child_for_new(self, key: str, engine_idx: int) -> PromMetric | None:
        """A labelled child for a tier seen for the first time; ``None`` for a key with no series."""
        base, _, tier = key.partition(".")
        metric = self._by_key.get((base, bool(tier)))
        labelvalues = self.per_engine_labelvalues.get(engine_idx)
        if metric is None or labelvalues is None:
            return None  # a counter of a newer version of the stats contract: logged, not exported
        child = metric.labels(*labelvalues, tier) if tier else metric.labels(*labelvalues)
        self._children[engine_idx, key] = child
        return child


# vLLM unregisters only its own ("vllm:") collectors when it rebuilds its loggers (tests, a second
# engine in one process); ours would then be registered twice, which prometheus_client refuses.
_registered: list[PromMetric] = []


def _unregister_previous() -> None:
    from prometheus_client import REGISTRY

    while _registered:
        try:
            REGISTRY.unregister(_registered.pop())
        except KeyError:
            pass  # registered elsewhere (e.g. Ray's wrappers) or already gone


def build_prom_metrics(
    vllm_config: Any,
    metric_types: dict[type[PromMetric], type[PromMetricT]],
    labelnames: list[str],
    per_engine_labelvalues: dict[int, list[object]],
) -> LMCacheConnectorPromMetrics:
    """What ``LMCacheConnector.build_prom_metrics`` returns to vLLM's ``KVConnectorProm``."""
    return LMCacheConnectorPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
