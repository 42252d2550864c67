"""With vLLM's own prefix caching on (what users run), the connector supplies only what vLLM lacks."""

from __future__ import annotations

import pytest
from vllm_support import assert_same_greedy, start_engine

from lmcache_connector.testing.tiny_model import TINY, random_prompt


@pytest.fixture(scope="module")
def engine(engine_tmp):
    # A KV cache of 40 blocks (1,280 tokens) cannot keep several 600-token prompts at once.
    engine = start_engine(
        TINY,
        engine_tmp,
        enable_prefix_caching=True,
        num_gpu_blocks_override=40,
        max_model_len=1024,
        extra_config={"chunk_size": 128},
    )
    yield engine
    engine.close()


def _hits(engine) -> int:
    return engine.call("connector_state")["totals"]["hit_tokens"]


def test_connector_fills_in_after_vllm_evicted_the_prompt(engine):
    prompt = random_prompt(600, seed=1)
    cold = engine.generate([prompt], max_tokens=10, logprobs=5)[0]

    before = _hits(engine)
    local = engine.generate([prompt], max_tokens=10, logprobs=5)[0]
    assert local["num_cached_tokens"] >= 576  # vLLM's own cache serves it...
    assert _hits(engine) == before  # ...and the connector loads nothing it already has
    assert_same_greedy(cold, local)

    for seed in (2, 3, 4):  # push the prompt out of vLLM's small cache
        engine.generate([random_prompt(600, seed=seed)], max_tokens=10)

    before = _hits(engine)
    warm = engine.generate([prompt], max_tokens=10, logprobs=5)[0]
    assert warm["num_cached_tokens"] == 576  # every whole block, from vLLM and the connector together
    assert _hits(engine) - before > 0  # the connector supplied what vLLM had lost
    assert_same_greedy(cold, warm)


def test_state_is_clean_afterwards(engine):
    state = engine.call("connector_state")
    assert (state["pins"], state["inflight"], state["tracked_requests"]) == (0, 0, 0)
