"""Two vLLM engine processes share one real redis-server: what one computed, the other loads.

The engines run side by side, one core each, with the remote tier on the same standalone Redis
(started by the test on loopback). Every check compares greedy outputs with the engine that
computed the prompt cold. The last tests take the server away: hung (SIGSTOP), then killed and
restarted; the engines keep serving correct outputs and sharing resumes without a restart.
"""

from __future__ import annotations

import contextlib

import pytest
import redis_servers as rs
import remote_engines as proofs
from remote_engines import engine_pair, remote_env

from lmcache_connector.testing.tiny_model import random_prompt
from lmcache_connector.tiers.remote.client import value_key


@pytest.fixture(scope="module")
def pair(engine_tmp, redis):
    with engine_pair(engine_tmp, remote_env(f"redis://127.0.0.1:{redis.port}")) as engines:
        yield engines


def test_a_second_engine_loads_what_the_first_computed(pair):
    proofs.second_engine_loads_what_the_first_computed(*pair)


def test_a_prompt_that_shares_part_of_a_chunk_reuses_every_shared_block(pair):
    proofs.a_prompt_sharing_part_of_a_chunk_reuses_every_shared_block(*pair)


def test_an_unrelated_prompt_hits_nothing(pair):
    proofs.an_unrelated_prompt_hits_nothing(pair[1])


def test_values_that_are_not_the_chunk_are_misses_and_the_output_stays_right(pair, redis):
    def plant(namespace: str, fps: list[str]) -> None:
        keys = [value_key("lmc:", namespace, "tp0pp0", fps[i]) for i in (3, 7, 11)]
        with redis.admin() as admin:
            first_value = admin.get(keys[0])
            admin.set(keys[0], first_value[:-1] + bytes([first_value[-1] ^ 0xFF]))  # corrupt
            admin.set(keys[1], admin.get(keys[1])[:1000])  # truncated
            admin.set(keys[2], b"\x80\x04pickled?")  # planted: never unpickled, never loaded

    proofs.planted_values_are_counted_misses(*pair, plant)


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
        marked_down = proofs.wait_until_down(second)
    finally:
        redis.resume()
    tokens = timeline["tokens"][0]
    gaps = [later - earlier for earlier, later in zip(tokens, tokens[1:], strict=False)]
    assert len(tokens) == 40 and timeline["late_first_token"] is not None
    # A scheduler that waited on the store would stall every running request for the lookup's
    # socket timeout (2 s); the deadline (300 ms) makes the late lookup a miss.
    assert max(gaps) < 1.0, f"a running request waited {max(gaps):.2f} s between two tokens"
    assert marked_down, "the hung store was never marked down"


def test_a_hung_store_costs_a_bounded_wait_and_the_batch_goes_on(pair, redis):
    proofs.a_hung_store_costs_a_bounded_wait(*pair, redis.pause, redis.resume)


def test_a_killed_store_is_recomputed_and_sharing_resumes_after_a_restart(pair, redis, tmp_path):
    """Last in the module: it kills the module's server and restarts one on the same port."""
    with contextlib.ExitStack() as restarted:
        proofs.sharing_resumes_after_a_restart(
            *pair,
            kill=redis.kill,
            restart=lambda: restarted.enter_context(rs.redis_server(tmp_path / "again", port=redis.port)),
        )
