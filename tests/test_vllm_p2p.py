"""Two vLLM engine processes share chunks peer to peer, found through a real redis-server registry.

Engine A computes, engine B (no tier but its own memory) fetches A's chunks from A's memory and
from A's disk, block-granular, with the same greedy output; both hold the same
``LMCACHE_P2P_AUTH_TOKEN``. A third engine with a wrong token gets nothing from A and serves
correctly. Last, A is killed mid-run: B recomputes what only A held, and its next request is served
from its own memory. The engines run side by side, one core each (the third takes B's core while B
is idle).
"""

from __future__ import annotations

import time

import pytest
import redis_servers as rs
from peer_support import free_ports
from remote_engines import BLOCK, CHUNK, one
from vllm_support import assert_same_greedy, start_engine

from lmcache_connector.testing.tiny_model import TINY, random_prompt
from lmcache_connector.tiers.peer.registry import holders_key

TOKEN = "a-token-the-deployment-shares-0123456789"
BLOCKS_PER_CHUNK = CHUNK["chunk_size"] // BLOCK


def p2p_env(redis, **extra: str) -> dict[str, str]:
    return {
        "LMCACHE_ENABLE_P2P": "True",
        "LMCACHE_LOOKUP_URL": f"redis://127.0.0.1:{redis.port}",
        "LMCACHE_DISTRIBUTED_URL": f"127.0.0.1:{free_ports(1)}",
        "LMCACHE_P2P_AUTH_TOKEN": TOKEN,
        "LMCACHE_REMOTE_LOOKUP_TIMEOUT_MS": "300",
        "LMCACHE_BLOCKING_TIMEOUT_SECS": "2",
        **extra,
    }


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    with rs.redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def pair(engine_tmp, redis):
    """A: a memory tier of 8 chunks and a disk tier; B: memory only."""
    env_a = p2p_env(
        redis,
        LMCACHE_MAX_LOCAL_CPU_SIZE="0.0005",
        LMCACHE_LOCAL_DISK=str(engine_tmp / "disk-a"),
        LMCACHE_MAX_LOCAL_DISK_SIZE="0.1",
    )
    first = start_engine(TINY, engine_tmp, env=env_a, extra_config=CHUNK, cpus={0})
    try:
        second = start_engine(TINY, engine_tmp, env=p2p_env(redis), extra_config=CHUNK, cpus={1})
        try:
            yield first, second
        finally:
            second.close()
    finally:
        first.close()


def computed_and_published(engine, redis, prompt) -> dict:
    """Serve ``prompt`` on ``engine`` and wait until the registry names a holder of each of its chunks."""
    out = one(engine, prompt)
    engine.call("connector_state")  # the workers report the chunks stored: held, so published
    ids = engine.call("fingerprints", prompt=prompt)
    fps = ids["fingerprints"]
    keys = [fps[min(i + BLOCKS_PER_CHUNK, len(fps)) - 1] for i in range(0, len(fps), BLOCKS_PER_CHUNK)]
    names = [holders_key("lmc:", ids["namespace"], key) for key in keys]
    deadline = time.monotonic() + 10
    with redis.admin() as admin:
        while not all(admin.scard(name) for name in names):
            assert time.monotonic() < deadline, "the chunks were never published"
            time.sleep(0.05)
    return out


def peer_hits(engine) -> int:
    return engine.call("connector_state", settle=False)["totals"]["hit_tokens_by_tier"].get("peer", 0)


def worker_total(engine, key: str) -> float:
    return engine.call("connector_state")["worker_totals"].get(key, 0)


def test_a_second_engine_fetches_what_the_first_holds_in_memory(pair, redis):
    first, second = pair
    prompt = random_prompt(600, seed=1)
    cold = computed_and_published(first, redis, prompt)
    served = worker_total(first, "served_chunks.peer")
    warm = one(second, prompt)
    assert warm["num_cached_tokens"] == 600 // BLOCK * BLOCK  # every whole block, the partial chunk too
    assert peer_hits(second) == warm["num_cached_tokens"]  # vLLM counts them under source="p2p"
    assert_same_greedy(cold, warm)
    assert worker_total(first, "served_chunks.peer") - served == 5


def test_a_prompt_sharing_part_of_a_chunk_reuses_every_shared_block(pair, redis):
    first, second = pair
    document = random_prompt(500, seed=2)
    computed_and_published(first, redis, document)
    question = document[:300] + random_prompt(100, seed=3)  # diverges inside the third chunk
    warm = one(second, question)
    assert warm["num_cached_tokens"] == 300 // BLOCK * BLOCK
    assert_same_greedy(one(first, question), warm)


def test_a_chunk_the_first_engine_holds_only_on_disk_is_fetched_from_its_disk(pair, redis):
    first, second = pair
    prompt = random_prompt(600, seed=4)
    cold = computed_and_published(first, redis, prompt)
    for seed in (5, 6):  # ten more chunks through A's 8 memory slots: the prompt's are evicted
        computed_and_published(first, redis, random_prompt(600, seed=seed))
    warm = one(second, prompt)
    assert warm["num_cached_tokens"] == 600 // BLOCK * BLOCK
    assert_same_greedy(cold, warm)


def test_an_engine_with_a_wrong_token_gets_no_chunk_and_serves_correctly(pair, redis, engine_tmp):
    first, _ = pair
    prompt = random_prompt(400, seed=7)
    cold = computed_and_published(first, redis, prompt)
    served = worker_total(first, "served_chunks.peer")
    env = p2p_env(redis, LMCACHE_P2P_AUTH_TOKEN="not-the-token-of-the-deployment")
    with start_engine(TINY, engine_tmp, env=env, extra_config=CHUNK, cpus={1}) as intruder:
        out = one(intruder, prompt)
        assert worker_total(intruder, "failed_loads") > 0  # it tried A, which refused it
    assert_same_greedy(cold, out)
    assert worker_total(first, "served_chunks.peer") == served


def test_a_peer_killed_mid_run_is_a_recompute_and_the_next_request_works(pair, redis):
    """Last in the module: it kills engine A."""
    first, second = pair
    prompt = random_prompt(400, seed=8)
    cold = computed_and_published(first, redis, prompt)
    failed = worker_total(second, "failed_loads")
    first.kill()  # its registry entries live on until its liveness key expires
    recomputed = one(second, prompt)
    assert_same_greedy(cold, recomputed)
    assert worker_total(second, "failed_loads") > failed  # B tried the dead peer, then recomputed
    again = one(second, prompt)  # recomputed, stored in B's own memory
    assert again["num_cached_tokens"] == 400 // BLOCK * BLOCK
    assert_same_greedy(cold, again)
