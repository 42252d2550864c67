"""The memory tier stays within LMCACHE_MAX_LOCAL_CPU_SIZE, evicts least-recently-used chunks,
and keeps serving hits on what remains."""

from __future__ import annotations

import pytest
from vllm_support import start_engine

from lmcache_connector.testing.tiny_model import TINY, random_prompt

LIMIT_GB = 0.001  # 16 chunk slots of 64 KiB for this model (4 blocks x 2 layers x 8 KiB)
PROMPT = 1024  # 8 whole chunks of 128 tokens: two prompts fill the tier


@pytest.fixture(scope="module")
def engine(engine_tmp):
    engine = start_engine(
        TINY, engine_tmp, env={"LMCACHE_MAX_LOCAL_CPU_SIZE": str(LIMIT_GB)}, extra_config={"chunk_size": 128}
    )
    yield engine
    engine.close()


def _cached(engine, prompt) -> int:
    return engine.generate([prompt], max_tokens=2)[0]["num_cached_tokens"]


def test_tier_stays_within_its_size_and_evicts_least_recently_used(engine):
    prompts = [random_prompt(PROMPT, seed=900 + i) for i in range(10)]
    limit = int(LIMIT_GB * 1024**3)
    state = engine.call("connector_state")
    assert state["num_slots"] == 16 and state["pool_bytes"] <= limit

    _cached(engine, prompts[0])
    _cached(engine, prompts[1])
    assert _cached(engine, prompts[0]) == PROMPT - 1  # a hit also marks prompt 0 as recently used
    _cached(engine, prompts[2])  # needs 8 slots: evicts prompt 1, the least recently used
    assert _cached(engine, prompts[0]) == PROMPT - 1
    assert _cached(engine, prompts[1]) == 0

    for prompt in prompts[3:]:  # store five times the tier's capacity in total
        _cached(engine, prompt)
        state = engine.call("connector_state")
        assert state["used_slots"] <= state["num_slots"]
        assert state["stored_bytes"] <= limit
    assert state["evictions"] >= 40
    assert _cached(engine, prompts[-1]) == PROMPT - 1  # what remains still hits
    assert _cached(engine, prompts[3]) == 0
    state = engine.call("connector_state")
    assert (state["pins"], state["inflight"]) == (0, 0)
    assert state["pool_bytes"] <= limit
