"""Two vLLM engine processes share LMCache's real cache server (``lm://``): what one computed, the other loads.

The same proofs as ``test_vllm_remote.py`` (Redis), on ``lmcache_server`` started by the test on
loopback (``lm_servers.py``): the engines run side by side, one core each; every check compares
greedy outputs with the engine that computed the prompt cold. The last tests take the server away:
hung (SIGSTOP: connections are accepted, nothing is answered), then killed and restarted on the
same port; the engines keep serving correct outputs and sharing resumes without an engine restart.
"""

from __future__ import annotations

import lm_servers as ls
import pytest
import remote_engines as proofs
from remote_engines import engine_pair, remote_env

from lmcache_connector.tiers.remote.lm_client import lm_key, value_key


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ls.lm_server(tmp_path_factory.mktemp("lm")) as srv:
        yield srv


@pytest.fixture(scope="module")
def pair(engine_tmp, server):
    with engine_pair(engine_tmp, remote_env(server.url)) as engines:
        yield engines


def test_a_second_engine_loads_what_the_first_computed(pair):
    proofs.second_engine_loads_what_the_first_computed(*pair)


def test_a_prompt_that_shares_part_of_a_chunk_reuses_every_shared_block(pair):
    proofs.a_prompt_sharing_part_of_a_chunk_reuses_every_shared_block(*pair)


def test_an_unrelated_prompt_hits_nothing(pair):
    proofs.an_unrelated_prompt_hits_nothing(pair[1])


def test_values_that_are_not_the_chunk_are_misses_and_the_output_stays_right(pair, server):
    def plant(namespace: str, fps: list[str]) -> None:
        keys = [lm_key(value_key("lmc:", namespace, "tp0pp0", fps[i])) for i in (3, 7, 11)]
        ls.raw_put(server.port, keys[0], b"LMCV" + bytes(2000))  # a broken value of ours
        ls.raw_put(server.port, keys[1], b"\x00" * 100)  # foreign bytes
        ls.raw_put(server.port, keys[2], b"\x80\x04pickled?")  # planted: never unpickled, never loaded

    proofs.planted_values_are_counted_misses(*pair, plant)


def test_a_hung_server_costs_a_bounded_wait_and_the_batch_goes_on(pair, server):
    proofs.a_hung_store_costs_a_bounded_wait(*pair, server.pause, server.resume)


def test_a_killed_server_is_recomputed_and_sharing_resumes_after_a_restart(pair, server):
    """Last in the module: it kills the module's server and restarts it on the same port."""
    proofs.sharing_resumes_after_a_restart(*pair, kill=server.kill, restart=server.start)
