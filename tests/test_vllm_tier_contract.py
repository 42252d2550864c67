"""The tier contract on a real vLLM engine: a medium defined in the tests (``dict_medium``),
registered through ``LMCACHE_EXTRA_TIERS``, with asynchronous fills, serves chunks the memory tier
evicted, and a stale entry is a recompute with the right output. No line of ``connector/`` knows it.
"""

from __future__ import annotations

import pytest
from vllm_support import start_engine

from lmcache_connector.testing.tiny_model import TINY, random_prompt

CHUNK_BYTES = 128 * 1024  # TINY in float32: 4 blocks of 32 tokens


@pytest.fixture(scope="module")
def engines(engine_tmp):
    env = {
        "LMCACHE_EXTRA_TIERS": "dict_medium:DictMedium",
        "DICT_TIER_ASYNC": "1",
        "DICT_TIER_DELAY_S": "0.002",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": str(6 * CHUNK_BYTES / 2**30),  # one 640-token document
        "LMCACHE_LOAD_FAILURE_POLICY": "fail",  # a promised hit that is not delivered fails loudly
    }
    engine = start_engine(TINY, engine_tmp, env=env, extra_config={"chunk_size": 128}, dtype="float32")
    baseline = start_engine(TINY, engine_tmp, connector=False, dtype="float32")
    yield engine, baseline
    engine.close()
    baseline.close()


def _one(engine, prompt):
    return engine.generate([prompt], max_tokens=8)[0]


def test_a_medium_registered_from_outside_serves_evicted_chunks_asynchronously(engines):
    engine, baseline = engines
    document = random_prompt(640, seed=5)
    _one(engine, document + [9, 9])
    _one(engine, random_prompt(640, seed=6) + [9, 9])  # pushes the document out of the memory tier
    warm = _one(engine, document + [7, 7, 7])
    assert warm["num_cached_tokens"] == 640  # all five chunks, filled from the dict tier in the background
    assert warm["finish_reason"] == "length"
    assert warm["token_ids"] == _one(baseline, document + [7, 7, 7])["token_ids"]
    state = engine.call("connector_state")
    assert state["tiers"]["dict"]["chunks"] >= 10
    assert (state["pins"], state["inflight"]) == (0, 0)
