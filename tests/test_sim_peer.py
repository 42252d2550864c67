"""The peer tier under the simulation harness (vLLM's real scheduler, the connector's real halves, KV
checked on every forward), with tensor parallelism and a real redis-server as the lookup registry:
two instances share chunks rank to rank, and a peer rank that fails mid-run is a recompute on every
rank, never wrong KV in attention."""

from __future__ import annotations

import time

import pytest
import redis_servers as rs
from peer_support import free_ports
from sim_harness import SimFactory, clear_lmcache_env

from lmcache_connector.testing.tiny_model import random_prompt

DOCUMENT_TOKENS = 96  # 3 chunks of 32 tokens (2 blocks of 16)
TP = 2


@pytest.fixture
def instances(tmp_path, monkeypatch):
    """``make(**extra)`` builds another simulated engine (TP=2) serving peers on ports of its own,
    all in one registry."""
    clear_lmcache_env(monkeypatch)
    with rs.redis_server(tmp_path / "redis") as server:
        factory = SimFactory(tmp_path)

        def make(disk: bool = False, **extra):
            settings = {
                "enable_p2p": True,
                "lookup_url": f"redis://127.0.0.1:{server.port}",
                "distributed_url": f"127.0.0.1:{free_ports(TP)}",
                "remote_lookup_timeout_ms": 5000,
                **extra,
            }
            return factory(tp=TP, prefix_caching=False, memory_chunks=4, disk=disk, extra_config=settings)

        make.server = server
        yield make
        factory.close()


def published(sim, count: int) -> None:
    """Wait until the instance's registry entries name ``count`` chunks."""
    catalog = sim.connector.planner._tiers["peer"]
    deadline = time.monotonic() + 10
    while catalog.held() < count or not catalog.publisher.flush(1.0):
        sim.settle(max_requests=1)
        if time.monotonic() > deadline:
            raise AssertionError(f"published {catalog.held()} chunks, not {count}")


def test_a_second_instance_fetches_every_ranks_shard_from_the_same_rank_of_the_first(instances):
    document = random_prompt(DOCUMENT_TOKENS, seed=1)
    first = instances()
    first.serve(document + [5, 6])
    published(first, 3)
    second = instances()
    req = second.serve(document + [7, 8, 9])
    assert second.hit_tokens(req) == DOCUMENT_TOKENS
    assert not second.errors()
    # vLLM's prompt_tokens_cached_by_source counts these hits as p2p.
    assert second.connector.planner.hit_sources()["peer"] == "p2p"
    assert second.connector.planner.totals.hit_tokens_by_tier == {"peer": DOCUMENT_TOKENS}
    # Rank r fetched from rank r of the first instance: each served its own shard of every chunk
    # (counted by the first instance's workers at their next step).
    first.serve([5, 6, 7])
    served = [w.executor.counters.totals().get("served_chunks.peer", 0) for w in first.workers]
    assert served == [3, 3]
    second.assert_clean()
    first.assert_clean()


def test_a_peer_rank_that_stops_serving_is_a_recompute_on_every_rank_and_the_next_request_works(instances):
    document = random_prompt(DOCUMENT_TOKENS, seed=2)
    first = instances()
    first.serve(document + [5, 6])
    published(first, 3)
    first.workers[1].executor.stores["peer"].server.close()  # rank 1 of the first instance dies
    second = instances(blocking_timeout_secs=2)
    second.serve(document + [7, 8, 9])
    totals = second.workers[1].executor.counters.totals()
    # Each of the three chunks' loads failed once (vLLM recomputed them), counted once, whatever
    # number of its reads from the dead rank had started.
    assert totals.get("failed_loads", 0) == 3 and 1 <= totals.get("failed_reads.peer", 0) <= 3, totals
    assert second.reported_at  # reported to vLLM, which recomputed the blocks: every forward read right KV
    assert not second.errors()
    again = second.serve(document + [1, 2, 3])  # recomputed, stored in its own memory, served from there
    assert second.hit_tokens(again) == DOCUMENT_TOKENS
    second.assert_clean()


def test_what_an_instance_no_longer_holds_is_withdrawn_and_a_reset_withdraws_everything(instances):
    documents = [random_prompt(DOCUMENT_TOKENS, seed=s) for s in (3, 4)]
    first = instances()
    first.serve(documents[0] + [5, 6])
    published(first, 3)
    first.serve(documents[1] + [5, 6])  # 4 memory slots: most of the first document is evicted
    catalog = first.connector.planner._tiers["peer"]
    first.settle()
    index = first.connector.planner.index
    assert catalog.held() == len(index) == 4
    # The workers serve peers only what their slots hold now: an evicted chunk's slot was overwritten.
    for worker in first.workers:
        for document in documents:
            for fp in _fingerprints(first, document):
                assert (fp in worker.executor.slots) == (fp in index)
    assert first.connector.reset_cache()
    assert catalog.held() == 0 and catalog.publisher.flush(5)
    first.serve([5, 6, 7])  # the next step tells the workers: nothing in their slots is served any more
    assert not any(fp in worker.executor.slots for worker in first.workers for fp in _fingerprints(first, documents[1]))
    second = instances()
    req = second.serve(documents[1] + [7, 8])
    assert second.hit_tokens(req) == 0  # nothing of the first instance is offered any more
    assert not second.errors()
    second.assert_clean()


def test_a_chunk_only_on_the_peers_disk_is_fetched_from_there(instances):
    documents = [random_prompt(DOCUMENT_TOKENS, seed=s) for s in (5, 6)]
    first = instances(disk=True)
    first.serve(documents[0] + [5, 6])
    first.serve(documents[1] + [5, 6])  # evicts most of the first document from memory; disk keeps it
    published(first, 6)
    index = first.connector.planner.index
    on_disk_only = [fp for fp in _fingerprints(first, documents[0])[1::2] if fp not in index]
    assert on_disk_only
    second = instances()
    req = second.serve(documents[0] + [7, 8])
    assert second.hit_tokens(req) == DOCUMENT_TOKENS
    assert not second.errors()
    second.assert_clean()


def _fingerprints(sim, tokens) -> list[bytes]:
    from lmcache_connector.keys import block_fingerprints, request_root

    planner = sim.connector.planner
    return block_fingerprints(request_root(planner.namespace_digest), tokens, planner.geometry.block_size)


def test_with_the_registry_hung_both_instances_serve_from_their_own_tiers_and_sharing_resumes(instances):
    documents = [random_prompt(DOCUMENT_TOKENS, seed=s) for s in (7, 8)]
    first = instances(remote_lookup_timeout_ms=300)
    first.serve(documents[0] + [5, 6])
    published(first, 3)
    second = instances(remote_lookup_timeout_ms=300)
    instances.server.pause()
    try:
        req = second.serve(documents[0] + [7, 8])  # the lookup waits 300 ms at most, then recomputes
        assert second.hit_tokens(req) == 0
        assert not second.connector.planner.state()["tiers"]["peer"]["up"]
        mine = first.serve(documents[0] + [1, 2])  # the first serves from its own memory meanwhile
        assert first.hit_tokens(mine) == DOCUMENT_TOKENS
        first.serve(documents[1] + [5, 6])
    finally:
        instances.server.resume()
    deadline = time.monotonic() + 20
    seed = 100
    while True:  # the view probes the registry again (0.5 s, then doubling); the publisher catches up
        seed += 1
        document = random_prompt(DOCUMENT_TOKENS, seed=seed)  # new to both: a hit can only come from the first
        first.serve(document + [5, 6])
        first.settle(max_requests=1)
        req = second.serve(document + [7, 8])
        if second.hit_tokens(req) == DOCUMENT_TOKENS:
            break
        assert time.monotonic() < deadline, "sharing never resumed after the registry came back"
        time.sleep(0.2)
    assert second.connector.planner.totals.hit_tokens_by_tier["peer"] == DOCUMENT_TOKENS
    assert not second.errors() and not first.errors()
    second.assert_clean()


def test_a_peer_a_worker_skips_is_not_planned_from_until_its_window_ends(instances):
    """Rank 1 of the second instance finds the first's rank 1 dead and skips it (1 s); the scheduler
    hears of it in the same step's report, so the next request for another chunk the first holds
    is computed at once: no fill planned from the peer, no load that fails, nothing reported to vLLM."""
    document, other = random_prompt(DOCUMENT_TOKENS, seed=3), random_prompt(32, seed=4)
    first = instances()
    first.serve(document + [5, 6])
    first.serve(other + [5, 6])
    published(first, 4)
    first.workers[1].executor.stores["peer"].server.close()
    second = instances(blocking_timeout_secs=2)
    second.serve(document + [7, 8, 9])  # planned from the first; rank 1's fill fails: recomputed
    failed = [w.executor.counters.totals().get("failed_loads", 0) for w in second.workers]
    reported = dict(second.reported_at)
    assert failed[1] > 0 and reported
    started = time.monotonic()
    req = second.serve(other + [7, 8, 9])
    assert time.monotonic() - started < 1.0, "the request came after the skip window: nothing proved"
    assert second.hit_tokens(req) == 0
    assert [w.executor.counters.totals().get("failed_loads", 0) for w in second.workers] == failed
    assert second.reported_at == reported  # no load error: vLLM never waited for the peer
    assert not second.errors()
    second.assert_clean()
