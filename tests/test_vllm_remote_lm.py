"""Two vLLM engine processes share LMCache's real cache server (``lm://``): what one computed, the other loads.

The same proofs as ``test_vllm_remote.py`` (Redis), on ``lmcache_server`` started by the test on
loopback (``lm_servers.py``): the engines run side by side, one core each; every check compares
greedy outputs with the engine that computed the prompt cold. The last tests take the server away:
hung (SIGSTOP: connections are accepted, nothing is answered), then killed and restarted on the
same port; the engines keep serving correct outputs and sharing resumes without an engine restart.
"""

from __future__ import annotations

import time

import lm_servers as ls
import pytest
from vllm_support import assert_same_greedy, start_engine

from lmcache_connector.testing.tiny_model import TINY, random_prompt
from lmcache_connector.tiers.remote.lm_client import lm_key, value_key

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
def server(tmp_path_factory):
    with ls.lm_server(tmp_path_factory.mktemp("lm")) as srv:
        yield srv


@pytest.fixture(scope="module")
def pair(engine_tmp, server):
    env = remote_env(server.url)
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
    assert warm["num_cached_tokens"] == 600 // BLOCK * BLOCK  # every whole block, from lmcache_server
    assert remote_hits(second) - before == warm["num_cached_tokens"]
    assert_same_greedy(cold, warm)


def test_a_prompt_that_shares_part_of_a_chunk_reuses_every_shared_block(pair):
    first, second = pair
    document = random_prompt(500, seed=2)
    computed_and_shared(first, document)
    question = document[:300] + random_prompt(100, seed=3)  # diverges inside the third chunk
    warm = one(second, question)
    assert warm["num_cached_tokens"] == 300 // BLOCK * BLOCK
    assert_same_greedy(one(first, question), warm)


def test_an_unrelated_prompt_hits_nothing(pair):
    _, second = pair
    assert one(second, random_prompt(400, seed=4))["num_cached_tokens"] == 0


def test_values_that_are_not_the_chunk_are_misses_and_the_output_stays_right(pair, server):
    first, second = pair
    prompt = random_prompt(384, seed=5)
    cold = computed_and_shared(first, prompt)
    ids = first.call("fingerprints", prompt=prompt)
    fps = ids["fingerprints"]
    keys = [lm_key(value_key("lmc:", ids["namespace"], "tp0pp0", fps[i])) for i in (3, 7, 11)]
    ls.raw_put(server.port, keys[0], b"LMCV" + bytes(2000))  # a broken value of ours
    ls.raw_put(server.port, keys[1], b"\x00" * 100)  # foreign bytes
    ls.raw_put(server.port, keys[2], b"\x80\x04pickled?")  # planted: never unpickled, never loaded
    before = second.call("connector_state", settle=False)["worker_totals"].get("bad_values.remote", 0)
    warm = one(second, prompt)  # the first chunk is bad: every block is recomputed
    assert_same_greedy(cold, warm)
    after = second.call("connector_state", settle=False)["worker_totals"].get("bad_values.remote", 0)
    assert after > before


def test_a_hung_server_costs_a_bounded_wait_and_the_batch_goes_on(pair, server):
    first, second = pair
    prompts = [random_prompt(300, seed=6), random_prompt(300, seed=7)]
    expected = first.generate(prompts, max_tokens=8, logprobs=5)
    first.call("connector_state")
    server.pause()
    try:
        started = time.monotonic()
        fresh = [random_prompt(300, seed=8), random_prompt(300, seed=9)]
        served = second.generate(fresh + prompts, max_tokens=8, logprobs=5)
        elapsed = time.monotonic() - started
        state = second.call("connector_state", settle=False)
    finally:
        server.resume()
    # The lookup deadline (300 ms) and the blocking timeout (2 s) bound the wait.
    assert elapsed < 15, f"{elapsed:.1f} s with a hung server"
    for out, ref in zip(served[2:], expected, strict=True):
        assert_same_greedy(ref, out)
    assert not state["tiers"]["remote"]["up"]


def test_a_killed_server_is_recomputed_and_sharing_resumes_after_a_restart(pair, server):
    """Last in the module: it kills the module's server and restarts it on the same port."""
    first, second = pair
    server.kill()
    prompt = random_prompt(400, seed=10)
    cold = one(first, prompt)
    assert_same_greedy(cold, one(second, prompt))  # both recompute; no error reaches a request
    server.start()  # same port, empty: what was stored before the restart is gone
    deadline = time.monotonic() + 60
    seed = 100
    while True:
        seed += 1
        shared = random_prompt(300, seed=seed)
        cold = computed_and_shared(first, shared)
        warm = one(second, shared)
        if warm["num_cached_tokens"] > 0:
            break
        assert time.monotonic() < deadline, "sharing did not resume after the server came back"
        time.sleep(0.5)
    assert warm["num_cached_tokens"] == 288
    assert_same_greedy(cold, warm)
