"""Two vLLM engine processes share one real redis-server: what one computed, the other loads.

The engines run side by side, one core each, with the remote tier on the same standalone Redis
(started by the test on loopback). Every check compares greedy outputs with the engine that
computed the prompt cold. The last tests take the server away: hung (SIGSTOP), then killed and
restarted; the engines keep serving correct outputs and sharing resumes without a restart.
"""

from __future__ import annotations

import time

import pytest
import redis_servers as rs
from vllm_support import assert_same_greedy, start_engine

from lmcache_connector.testing.tiny_model import TINY, random_prompt
from lmcache_connector.tiers.remote.redis_client import value_key

CHUNK = {"chunk_size": 128}  # 4 blocks of 32 tokens: 64 KiB a chunk for this model
BLOCK = 32


def remote_env(url: str, **extra: str) -> dict[str, str]:
    return {
        "LMCACHE_REMOTE_URL": url,
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
    env = remote_env(f"redis://127.0.0.1:{redis.port}")
    first = start_engine(TINY, engine_tmp, env=env, extra_config=CHUNK, cpus={0})
    second = start_engine(TINY, engine_tmp, env=env, extra_config=CHUNK, cpus={1})
    yield first, second
    first.close()
    second.close()


def one(engine, prompt, max_tokens: int = 8) -> dict:
    return engine.generate([prompt], max_tokens=max_tokens, logprobs=5)[0]


def computed_and_shared(engine, prompt) -> dict:
    """Serve ``prompt`` on ``engine`` and wait until its chunks are in the remote store."""
    out = one(engine, prompt)
    engine.call("connector_state")  # flushes the remote writes and lets the engine hear of them
    return out


def remote_hits(engine) -> int:
    return engine.call("connector_state", settle=False)["totals"]["hit_tokens_by_tier"].get("remote", 0)


def test_a_second_engine_loads_what_the_first_computed(pair):
    first, second = pair
    prompt = random_prompt(600, seed=1)
    cold = computed_and_shared(first, prompt)
    before = remote_hits(second)
    warm = one(second, prompt)
    assert warm["num_cached_tokens"] == 600 // BLOCK * BLOCK  # every whole block, from Redis
    assert remote_hits(second) - before == warm["num_cached_tokens"]
    assert_same_greedy(cold, warm)


def test_a_prompt_that_shares_part_of_a_chunk_reuses_every_shared_block(pair):
    first, second = pair
    document = random_prompt(500, seed=2)
    computed_and_shared(first, document)
    question = document[:300] + random_prompt(100, seed=3)  # diverges inside the third chunk
    warm = one(second, question)
    assert warm["num_cached_tokens"] == 300 // BLOCK * BLOCK
    # Now the first engine serves the question too (its own memory tier has the document's blocks).
    assert_same_greedy(one(first, question), warm)


def test_an_unrelated_prompt_hits_nothing(pair):
    _, second = pair
    assert one(second, random_prompt(400, seed=4))["num_cached_tokens"] == 0


def test_values_that_are_not_the_chunk_are_misses_and_the_output_stays_right(pair, redis):
    first, second = pair
    prompt = random_prompt(384, seed=5)
    cold = computed_and_shared(first, prompt)
    ids = first.call("fingerprints", prompt=prompt)
    fps = ids["fingerprints"]
    keys = [value_key("lmc:", ids["namespace"], "tp0pp0", fps[i]) for i in (3, 7, 11)]
    with redis.admin() as admin:
        first_value = admin.get(keys[0])
        admin.set(keys[0], first_value[:-1] + bytes([first_value[-1] ^ 0xFF]))  # corrupt
        admin.set(keys[1], admin.get(keys[1])[:1000])  # truncated
        admin.set(keys[2], b"\x80\x04pickled?")  # planted: never unpickled, never loaded
    before = second.call("connector_state", settle=False)["worker_totals"].get("bad_values.remote", 0)
    warm = one(second, prompt)  # the first chunk is bad: every block is recomputed
    assert_same_greedy(cold, warm)
    after = second.call("connector_state", settle=False)["worker_totals"].get("bad_values.remote", 0)
    assert after > before


def test_running_requests_keep_decoding_while_a_lookup_waits_on_a_hung_store(pair, redis):
    _, second = pair
    assert second.call("connector_state", settle=False)["tiers"]["remote"]["up"]
    redis.pause()
    try:
        timeline = second.call(
            "decode_timeline",
            prompts=[random_prompt(64, seed=30)],
            max_tokens=40,
            late_prompt=random_prompt(300, seed=31),  # its lookup asks the hung store
            late_after_steps=5,
        )
        state = second.call("connector_state", settle=False)
    finally:
        redis.resume()
    tokens = timeline["tokens"][0]
    gaps = [later - earlier for earlier, later in zip(tokens, tokens[1:], strict=False)]
    assert len(tokens) == 40 and timeline["late_first_token"] is not None
    # A scheduler that waited on the store would stall every running request for the lookup's
    # socket timeout (2 s); the deadline (300 ms) only marks the tier down.
    assert max(gaps) < 1.0, f"a running request waited {max(gaps):.2f} s between two tokens"
    assert not state["tiers"]["remote"]["up"]


def test_a_hung_store_costs_a_bounded_wait_and_the_batch_goes_on(pair, redis):
    first, second = pair
    prompts = [random_prompt(300, seed=6), random_prompt(300, seed=7)]
    expected = first.generate(prompts, max_tokens=8, logprobs=5)
    first.call("connector_state")
    redis.pause()
    try:
        started = time.monotonic()
        fresh = [random_prompt(300, seed=8), random_prompt(300, seed=9)]
        served = second.generate(fresh + prompts, max_tokens=8, logprobs=5)
        elapsed = time.monotonic() - started
    finally:
        redis.resume()
    # The lookup deadline (300 ms) and the blocking timeout (2 s) bound the wait; no request waits
    # on the hung server for every step.
    assert elapsed < 15, f"{elapsed:.1f} s with a hung store"
    for out, ref in zip(served[2:], expected, strict=True):
        assert_same_greedy(ref, out)


def test_a_killed_store_is_recomputed_and_sharing_resumes_after_a_restart(pair, redis, tmp_path):
    """Last in the module: it kills the module's server and restarts one on the same port."""
    first, second = pair
    redis.kill()
    prompt = random_prompt(400, seed=10)
    cold = one(first, prompt)
    assert_same_greedy(cold, one(second, prompt))  # both recompute; no error reaches a request
    with rs.redis_server(tmp_path / "again", port=redis.port):
        deadline = time.monotonic() + 60
        seed = 100
        while True:
            seed += 1
            shared = random_prompt(300, seed=seed)
            cold = computed_and_shared(first, shared)
            warm = one(second, shared)
            if warm["num_cached_tokens"] > 0:
                break
            assert time.monotonic() < deadline, "sharing did not resume after the store came back"
            time.sleep(0.5)
        assert warm["num_cached_tokens"] == 288
        assert_same_greedy(cold, warm)
