"""What every remote store must show with two real vLLM engines, written once for all of them.

``test_vllm_remote.py`` (Redis), ``test_vllm_remote_s3.py`` (S3) and ``test_vllm_remote_lm.py``
(LMCache's server) start a store and a pair of engines on it (one core each, :func:`engine_pair`)
and call these proofs; what differs between stores (how to plant a bad value, pause or restart the
server) stays in each module. Every proof compares greedy outputs with the engine that computed the
prompt cold.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from vllm_support import assert_same_greedy, start_engine

from lmcache_connector.testing.tiny_model import TINY, random_prompt

CHUNK = {"chunk_size": 128}  # 4 blocks of 32 tokens: 64 KiB a chunk for the tiny model
BLOCK = 32


def remote_env(url: str, **extra: str) -> dict[str, str]:
    return {
        "LMCACHE_REMOTE_URL": url,
        "LMCACHE_REMOTE_LOOKUP_TIMEOUT_MS": "300",
        "LMCACHE_BLOCKING_TIMEOUT_SECS": "2",
        **extra,
    }


@contextmanager
def engine_pair(engine_tmp: Path, env: dict[str, str], second_env: dict[str, str] | None = None) -> Iterator[tuple]:
    """Two engines on the same store, side by side, one core each (the second with ``second_env``
    when given)."""
    first = start_engine(TINY, engine_tmp, env=env, extra_config=CHUNK, cpus={0})
    try:
        second = start_engine(TINY, engine_tmp, env=second_env or env, extra_config=CHUNK, cpus={1})
        try:
            yield first, second
        finally:
            second.close()
    finally:
        first.close()


def one(engine, prompt, max_tokens: int = 8) -> dict:
    return engine.generate([prompt], max_tokens=max_tokens, logprobs=5)[0]


def computed_and_shared(engine, prompt) -> dict:
    """Serve ``prompt`` on ``engine`` and wait until its chunks are in the remote store."""
    out = one(engine, prompt)
    engine.call("connector_state")  # flushes the remote writes and lets the engine hear of them
    return out


def remote_hits(engine) -> int:
    return engine.call("connector_state", settle=False)["totals"]["hit_tokens_by_tier"].get("remote", 0)


def bad_values(engine) -> float:
    return engine.call("connector_state", settle=False)["worker_totals"].get("bad_values.remote", 0)


# ---------------------------------------------------------------- the proofs


def second_engine_loads_what_the_first_computed(first, second, seed: int = 1) -> None:
    prompt = random_prompt(600, seed=seed)
    cold = computed_and_shared(first, prompt)
    before = remote_hits(second)
    warm = one(second, prompt)
    assert warm["num_cached_tokens"] == 600 // BLOCK * BLOCK  # every whole block, the partial chunk too
    assert remote_hits(second) - before == warm["num_cached_tokens"]
    assert_same_greedy(cold, warm)


def a_prompt_sharing_part_of_a_chunk_reuses_every_shared_block(first, second) -> None:
    document = random_prompt(500, seed=2)
    computed_and_shared(first, document)
    question = document[:300] + random_prompt(100, seed=3)  # diverges inside the third chunk
    warm = one(second, question)
    assert warm["num_cached_tokens"] == 300 // BLOCK * BLOCK
    # Now the first engine serves the question too (its own memory tier has the document's blocks).
    assert_same_greedy(one(first, question), warm)


def an_unrelated_prompt_hits_nothing(second) -> None:
    assert one(second, random_prompt(400, seed=4))["num_cached_tokens"] == 0


def planted_values_are_counted_misses(first, second, plant: Callable[[str, list[str]], None]) -> None:
    """``plant(namespace, fingerprints)`` damages the values of a 3-chunk prompt the first engine
    stored; the second engine recomputes it, with the right output, and counts the bad values."""
    prompt = random_prompt(384, seed=5)
    cold = computed_and_shared(first, prompt)
    ids = first.call("fingerprints", prompt=prompt)
    plant(ids["namespace"], ids["fingerprints"])
    before = bad_values(second)
    warm = one(second, prompt)  # the first chunk is bad: every block is recomputed
    assert_same_greedy(cold, warm)
    assert bad_values(second) > before


def a_hung_store_costs_a_bounded_wait(first, second, pause: Callable[[], None], resume: Callable[[], None]) -> None:
    prompts = [random_prompt(300, seed=6), random_prompt(300, seed=7)]
    expected = first.generate(prompts, max_tokens=8, logprobs=5)
    first.call("connector_state")
    pause()
    try:
        started = time.monotonic()
        fresh = [random_prompt(300, seed=8), random_prompt(300, seed=9)]
        served = second.generate(fresh + prompts, max_tokens=8, logprobs=5)
        elapsed = time.monotonic() - started
        marked_down = wait_until_down(second)
    finally:
        resume()
    # The lookup deadline (300 ms) and the blocking timeout (2 s) bound the wait; no request waits
    # on the hung store for every step.
    assert elapsed < 15, f"{elapsed:.1f} s with a hung store"
    for out, ref in zip(served[2:], expected, strict=True):
        assert_same_greedy(ref, out)
    assert marked_down, "the hung store was never marked down"


def wait_until_down(engine, timeout: float = 10.0) -> bool:
    """Whether the engine marks its remote tier down within ``timeout``: a lookup past its deadline
    is only a miss; the catalog's call failing at its socket timeout (2 s) marks the tier down."""
    deadline = time.monotonic() + timeout
    while True:
        engine.generate([[5, 6, 7]], max_tokens=1)  # a step (the scheduler polls its catalogs), no lookup
        if not engine.call("connector_state", settle=False)["tiers"]["remote"]["up"]:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def sharing_resumes_after_a_restart(first, second, kill: Callable[[], None], restart: Callable[[], None]) -> None:
    kill()
    prompt = random_prompt(400, seed=10)
    cold = one(first, prompt)
    assert_same_greedy(cold, one(second, prompt))  # both recompute; no error reaches a request
    restart()  # same address, empty: what was stored before is gone
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
