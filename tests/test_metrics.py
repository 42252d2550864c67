"""What vLLM's stats log and ``/metrics`` show of the connector, built through vLLM's own classes.

vLLM merges the workers' and the scheduler's stats every step, rebuilds them in the front end with
``build_kv_connector_stats``, logs ``reduce()`` every interval (``KVConnectorLogging``) and feeds
the Prometheus series that the connector's ``build_prom_metrics`` registered (``KVConnectorProm``).
These tests drive exactly those vLLM classes, with a private Prometheus registry.
"""

from __future__ import annotations

import functools

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from vllm.config import KVTransferConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorLogging, KVConnectorProm

from lmcache_connector.connector import metrics
from lmcache_connector.connector.metrics import LMCacheConnectorStats, build_stats
from lmcache_connector.counters import Counters

MiB = 2**20
LABELS = ["model_name", "engine"]


@pytest.fixture(scope="module")
def kv_transfer_config() -> KVTransferConfig:
    return KVTransferConfig(
        kv_connector="LMCacheConnector", kv_connector_module_path="lmcache_connector", kv_role="kv_both"
    )


def prometheus(kv_transfer_config, engines=(0,)):
    """vLLM's ``KVConnectorProm`` (as its ``PrometheusStatLogger`` builds it), on a fresh registry."""
    registry = CollectorRegistry()

    class Prom(KVConnectorProm):
        _gauge_cls = functools.partial(Gauge, registry=registry)
        _counter_cls = functools.partial(Counter, registry=registry)
        _histogram_cls = functools.partial(Histogram, registry=registry)

    prom = Prom(VllmConfig(kv_transfer_config=kv_transfer_config), LABELS, {e: ["tiny", str(e)] for e in engines})
    return prom, registry


def value(registry, name, engine="0", **labels) -> float | None:
    return registry.get_sample_value(name, {"model_name": "tiny", "engine": engine, **labels})


# ---------------------------------------------------------------- stats across workers and steps


def test_workers_counters_add_up_and_gauges_keep_one_value():
    worker0 = build_stats({"loaded_bytes.memory": 100, "load_seconds.memory": 0.5, "failed_loads": 1})
    worker1 = build_stats({"loaded_bytes.memory": 300, "load_seconds.memory": 0.25})
    scheduler = build_stats({"hit_tokens": 64, "usage_bytes.memory": 4096, "capacity_bytes.memory": 8192})

    merged = worker0.aggregate(worker1).aggregate(scheduler)
    assert merged.data == {
        "loaded_bytes.memory": 400,
        "load_seconds.memory": 0.75,
        "failed_loads": 1,
        "hit_tokens": 64,
        "usage_bytes.memory": 4096,
        "capacity_bytes.memory": 8192,
    }
    # A gauge is not summed over steps: two steps that both report 4 KiB in use still mean 4 KiB.
    merged.aggregate(build_stats({"usage_bytes.memory": 4096}))
    assert merged.data["usage_bytes.memory"] == 4096


def test_stats_survive_the_trip_to_the_front_end():
    counters = Counters()
    counters.add("hit_tokens", 32)
    counters.add("stored_bytes.memory", 1000)
    sent = build_stats(counters.take()).to_dict()  # only this dict crosses vLLM's IPC
    rebuilt = LMCacheConnectorStats(data={}).aggregate(build_stats(sent))
    assert rebuilt.data == {"hit_tokens": 32, "stored_bytes.memory": 1000}
    assert build_stats(None).is_empty() and not rebuilt.is_empty()


# ---------------------------------------------------------------- the periodic log line


def test_log_line_shows_hit_rate_tokens_and_mib_per_tier():
    stats = build_stats(
        {
            "requested_tokens": 1000,
            "hit_tokens": 250,
            "loaded_bytes.memory": 3 * MiB,
            "stored_bytes.memory": 12 * MiB,
            "usage_bytes.memory": 40 * MiB,
            "capacity_bytes.memory": 100 * MiB,
        }
    )
    assert stats.reduce() == {
        "hit_rate": 0.25,
        "hit_tokens": 250,
        "requested_tokens": 1000,
        "loaded_MiB.memory": 3.0,
        "stored_MiB.memory": 12.0,
        "used_MiB.memory": 40.0,
    }


def test_log_line_names_trouble_only_when_there_is_some():
    quiet = build_stats({"requested_tokens": 10, "failed_loads": 0}).reduce()
    assert set(quiet) == {"hit_rate", "hit_tokens", "requested_tokens"}

    trouble = build_stats(
        {"failed_loads": 2, "dropped_stores": 3, "failed_stores.disk": 1, "evictions.memory": 7, "remote_failures": 4}
    ).reduce()
    assert trouble["hit_rate"] == 0.0  # nothing requested: no division by zero
    assert {k: trouble[k] for k in trouble if k not in ("hit_rate", "hit_tokens", "requested_tokens")} == {
        "dropped_stores": 3,
        "evictions.memory": 7,
        "failed_loads": 2,
        "failed_stores.disk": 1,
        "remote_failures": 4,
    }


def test_vllm_logs_the_interval_summed_over_steps(kv_transfer_config):
    kv_logging = KVConnectorLogging(kv_transfer_config)
    kv_logging.observe({"requested_tokens": 600, "stored_bytes.memory": 2 * MiB})
    kv_logging.observe({"requested_tokens": 600, "hit_tokens": 576, "loaded_bytes.memory": 2 * MiB})
    lines = []
    kv_logging.log(log_fn=lambda fmt, *args: lines.append(fmt % args))
    assert lines == [
        "KV Transfer metrics: hit_rate=0.48, hit_tokens=576, requested_tokens=1200, "
        "loaded_MiB.memory=2.0, stored_MiB.memory=2.0"
    ]
    kv_logging.log(log_fn=lines.append)  # nothing new since: no line
    assert len(lines) == 1


# ---------------------------------------------------------------- Prometheus


def test_every_series_is_on_metrics_before_any_traffic(kv_transfer_config):
    _, registry = prometheus(kv_transfer_config)
    text = generate_latest(registry).decode()
    for series in metrics.SERIES:
        name = f"lmcache_connector_{series.name}" + ("" if series.gauge else "_total")
        assert f"\n{name}{{" in text, name
        if series.per_tier:
            for tier in ("memory", "disk"):
                assert value(registry, name, tier=tier) == 0
    assert value(registry, "lmcache_connector_hit_tokens_total") == 0


def test_steps_add_up_per_tier_and_gauges_show_the_latest(kv_transfer_config):
    prom, registry = prometheus(kv_transfer_config)
    prom.observe({"requested_tokens": 600, "stored_bytes.memory": 1000, "store_seconds.memory": 0.5,
                  "usage_bytes.memory": 1000, "capacity_bytes.memory": 10_000})  # fmt: skip
    prom.observe({"requested_tokens": 600, "hit_tokens": 576, "hit_tokens.memory": 576,
                  "loaded_bytes.memory": 1000, "load_seconds.memory": 0.25, "usage_bytes.memory": 800,
                  "evictions.memory": 1})  # fmt: skip

    assert value(registry, "lmcache_connector_requested_tokens_total") == 1200
    assert value(registry, "lmcache_connector_hit_tokens_total") == 576
    assert value(registry, "lmcache_connector_hit_tokens_by_tier_total", tier="memory") == 576
    assert value(registry, "lmcache_connector_hit_rate") == pytest.approx(0.48)
    assert value(registry, "lmcache_connector_stored_bytes_total", tier="memory") == 1000
    assert value(registry, "lmcache_connector_store_seconds_total", tier="memory") == 0.5
    assert value(registry, "lmcache_connector_loaded_bytes_total", tier="memory") == 1000
    assert value(registry, "lmcache_connector_load_seconds_total", tier="memory") == 0.25
    assert value(registry, "lmcache_connector_loaded_bytes_total", tier="disk") == 0
    assert value(registry, "lmcache_connector_evictions_total", tier="memory") == 1
    assert value(registry, "lmcache_connector_usage_bytes", tier="memory") == 800  # the latest, not a sum
    assert value(registry, "lmcache_connector_capacity_bytes", tier="memory") == 10_000


def test_every_documented_counter_reaches_a_series(kv_transfer_config):
    """Each key of the stats contract (``lmcache_connector.counters``) moves exactly one series."""
    prom, registry = prometheus(kv_transfer_config)
    contract = {
        "requested_tokens": "lmcache_connector_requested_tokens_total",
        "hit_tokens": "lmcache_connector_hit_tokens_total",
        "hit_tokens.disk": "lmcache_connector_hit_tokens_by_tier_total",
        "lookups": "lmcache_connector_lookups_total",
        "stored_bytes.disk": "lmcache_connector_stored_bytes_total",
        "store_seconds.disk": "lmcache_connector_store_seconds_total",
        "loaded_bytes.disk": "lmcache_connector_loaded_bytes_total",
        "load_seconds.disk": "lmcache_connector_load_seconds_total",
        "evictions.disk": "lmcache_connector_evictions_total",
        "dropped_stores": "lmcache_connector_dropped_stores_total",
        "failed_loads": "lmcache_connector_failed_loads_total",
        "failed_reads.peer": "lmcache_connector_failed_reads_total",
        "failed_stores.disk": "lmcache_connector_failed_stores_total",
        "remote_failures": "lmcache_connector_remote_failures_total",
        "usage_bytes.disk": "lmcache_connector_usage_bytes",
        "capacity_bytes.disk": "lmcache_connector_capacity_bytes",
        "dropped_writes.remote": "lmcache_connector_dropped_writes_total",
        "bad_values.remote": "lmcache_connector_bad_values_total",
        "tier_up.remote": "lmcache_connector_tier_up",
    }
    prom.observe({key: 7 for key in contract})
    for key, name in contract.items():
        labels = {"tier": key.partition(".")[2]} if "." in key else {}
        assert value(registry, name, **labels) == 7, key
    assert value(registry, "lmcache_connector_hit_rate") == 1.0


def test_a_new_tier_gets_its_own_label_and_unknown_keys_are_ignored(kv_transfer_config):
    prom, registry = prometheus(kv_transfer_config)
    prom.observe({"loaded_bytes.remote": 5, "a_counter_from_a_newer_version": 3})
    assert value(registry, "lmcache_connector_loaded_bytes_total", tier="remote") == 5
    assert "a_counter_from_a_newer_version" not in generate_latest(registry).decode()


def test_each_engine_has_its_own_series(kv_transfer_config):
    prom, registry = prometheus(kv_transfer_config, engines=(0, 1))
    prom.observe({"requested_tokens": 100, "hit_tokens": 100}, engine_idx=1)
    prom.observe({"requested_tokens": 100}, engine_idx=0)
    assert value(registry, "lmcache_connector_hit_tokens_total", engine="1") == 100
    assert value(registry, "lmcache_connector_hit_tokens_total", engine="0") == 0
    assert value(registry, "lmcache_connector_hit_rate", engine="1") == 1.0
    assert value(registry, "lmcache_connector_hit_rate", engine="0") == 0.0


def test_metrics_can_be_rebuilt_in_one_process(kv_transfer_config):
    """vLLM rebuilds its loggers (a second engine, tests) on the global registry; ours must not clash."""
    config = VllmConfig(kv_transfer_config=kv_transfer_config)
    try:
        KVConnectorProm(config, LABELS, {0: ["tiny", "0"]}).observe({"hit_tokens": 5})
        KVConnectorProm(config, LABELS, {0: ["tiny", "0"]}).observe({"hit_tokens": 2})
        sample = REGISTRY.get_sample_value("lmcache_connector_hit_tokens_total", {"model_name": "tiny", "engine": "0"})
        assert sample == 2  # the new series replaced the old one
    finally:
        metrics._unregister_previous()
