"""The remote tier under the simulation harness (vLLM's real scheduler, the connector's real halves, KV
checked on every forward), with tensor parallelism and a real redis-server: two instances share
chunks, and a rank's value that is missing or damaged at read time is a recompute on every rank,
never wrong KV in attention."""

from __future__ import annotations

import threading

import pytest
import redis_servers as rs
from sim_harness import SimFactory, clear_lmcache_env

from lmcache_connector.testing.tiny_model import random_prompt
from lmcache_connector.tiers.remote.redis_client import value_key

DOCUMENT_TOKENS = 96  # 3 chunks of 32 tokens (2 blocks of 16)


@pytest.fixture
def instances(tmp_path, monkeypatch):
    """``make()`` builds another simulated engine (TP=2) on the same Redis."""
    clear_lmcache_env(monkeypatch)
    with rs.redis_server(tmp_path / "redis") as server:
        factory = SimFactory(tmp_path)
        extra = {"remote_url": f"redis://127.0.0.1:{server.port}", "remote_lookup_timeout_ms": 5000}

        def make():
            return factory(tp=2, prefix_caching=False, memory_chunks=4, extra_config=extra)

        make.server = server
        yield make
        factory.close()


def shared(sim, documents) -> None:
    """Serve the documents and wait until every rank's values are in Redis."""
    for document in documents:
        sim.serve(document + [5, 6])
        # Each write keeps its memory slot pinned until every rank wrote it; a document served while
        # the last one's slots are still pinned would find no slot to store in (a dropped store).
        _settle_writes(sim)


def _settle_writes(sim) -> None:
    for _ in range(20):  # writes are queued when a step reports the chunk stored, then written in the background
        for worker in sim.workers:
            worker.executor.flush_writes(10)
        if not sim.settle(max_requests=1)["inflight"]:
            return
    raise AssertionError("the remote writes never finished")


def test_a_second_instance_loads_every_ranks_shard_of_what_the_first_computed(instances):
    documents = [random_prompt(DOCUMENT_TOKENS, seed=s) for s in range(3)]
    shared(instances(), documents)
    second = instances()
    for document in documents:
        req = second.serve(document + [7, 8, 9])
        assert second.hit_tokens(req) == DOCUMENT_TOKENS
    assert not second.errors()
    # vLLM's prompt_tokens_cached_by_source counts these hits as external_unspecified.
    assert second.connector.planner.hit_sources()["remote"] == "external_unspecified"
    assert second.connector.planner.totals.hit_tokens_by_tier["remote"] == 3 * DOCUMENT_TOKENS
    second.assert_clean()


def test_a_chunk_missing_one_ranks_shard_is_not_promised(instances):
    document = random_prompt(DOCUMENT_TOKENS, seed=10)
    first = instances()
    shared(first, [document])
    namespace = first.connector.planner.namespace_digest.hex()
    fps = _fingerprints(first, document)
    with instances.server.admin() as admin:
        assert admin.delete(value_key("lmc:", namespace, "tp1pp0", fps[3].hex())) == 1  # chunk 1, rank 1
    second = instances()
    req = second.serve(document + [7, 8, 9])
    assert second.hit_tokens(req) == 32  # chunk 0 only: chunk 1 lacks a shard, so nothing after it counts
    second.assert_clean()


@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_a_shard_gone_or_damaged_at_read_time_is_recomputed_on_every_rank(instances, damage):
    document = random_prompt(DOCUMENT_TOKENS, seed=20)
    first = instances()
    shared(first, [document])
    namespace = first.connector.planner.namespace_digest.hex()
    key = value_key("lmc:", namespace, "tp1pp0", _fingerprints(first, document)[3].hex())
    second = instances()
    store = second.workers[1].executor.stores["remote"]
    read_into = store.read_into

    damaged = threading.Lock()
    done = threading.Event()

    def damaged_just_before_reading(chunk_key, block_fps, regions):
        # The lookup saw every shard; between it and this rank's first read, Redis lost or mangled
        # one. A load's chunks are read concurrently: every read waits until the damage is done.
        with damaged:
            if not done.is_set():
                _damage(instances.server, key, damage)
                done.set()
        return read_into(chunk_key, block_fps, regions)

    store.read_into = damaged_just_before_reading
    second.serve(document + [7, 8, 9])
    assert second.workers[1].executor.counters.totals().get("failed_loads", 0) > 0
    assert second.reported_at  # blocks reported to vLLM, which recomputed them: every forward read right KV
    assert not second.errors()
    again = second.serve(document + [1, 2, 3])  # and what was recomputed is stored and served again
    assert second.hit_tokens(again) >= 32
    second.assert_clean()


def _damage(server, key: str, how: str) -> None:
    with server.admin() as admin:
        if how == "delete":
            assert admin.delete(key) == 1
        else:
            value = admin.get(key)
            admin.set(key, value[:-1] + bytes([value[-1] ^ 1]))


def _fingerprints(sim, tokens) -> list[bytes]:
    from lmcache_connector.keys import block_fingerprints, request_root

    planner = sim.connector.planner
    return block_fingerprints(request_root(planner.namespace_digest), tokens, planner.geometry.block_size)
