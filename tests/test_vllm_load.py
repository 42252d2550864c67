"""Under load: many concurrent requests, chunked prefill and preemption give correct outputs and
leave nothing behind (no pins, no in-flight transfers, no tracked requests)."""

from __future__ import annotations

import pytest
from vllm_support import assert_same_greedy, start_engine

from lmcache_connector.testing.tiny_model import TINY, random_prompt

# A small KV cache (64 blocks = 2,048 tokens) and a small token budget per step force both chunked
# prefill and preemption with the prompts below.
SETTINGS = {"dtype": "float32", "max_model_len": 1600, "max_num_batched_tokens": 512, "num_gpu_blocks_override": 64}


@pytest.fixture(scope="module")
def engines(engine_tmp):
    engine = start_engine(TINY, engine_tmp, extra_config={"chunk_size": 128}, **SETTINGS)
    baseline = start_engine(TINY, engine_tmp, connector=False, **SETTINGS)
    yield engine, baseline
    engine.close()
    baseline.close()


def _expected(baseline, prompts, max_tokens):
    return [baseline.generate([p], max_tokens=max_tokens, logprobs=5)[0] for p in prompts]


def _assert_clean(engine):
    state = engine.call("connector_state")
    assert (state["pins"], state["inflight"], state["tracked_requests"]) == (0, 0, 0)
    assert state["stored_bytes"] <= state["used_slots"] * state["slot_bytes"]
    return state


def test_sixteen_concurrent_requests_sharing_prefixes(engines):
    engine, baseline = engines
    documents = [random_prompt(300, seed=100 + d) for d in range(4)]
    prompts = [documents[i % 4] + random_prompt(20 + i, seed=200 + i) for i in range(16)]
    expected = _expected(baseline, prompts, 8)
    engine.generate(prompts[:4], max_tokens=8)  # store each document once
    outputs = engine.generate(prompts, max_tokens=8, logprobs=5)
    assert all(out["num_cached_tokens"] >= 288 for out in outputs)  # the shared 9 whole blocks
    for want, got in zip(expected, outputs, strict=True):
        assert_same_greedy(want, got)
    _assert_clean(engine)


def test_prompt_longer_than_the_step_budget_is_stored_and_reused(engines):
    engine, baseline = engines
    prompt = random_prompt(1500, seed=7)  # three chunked-prefill steps of at most 512 tokens
    expected = _expected(baseline, [prompt], 8)[0]
    assert engine.generate([prompt], max_tokens=8)[0]["num_cached_tokens"] == 0
    warm = engine.generate([prompt], max_tokens=8, logprobs=5)[0]
    assert warm["num_cached_tokens"] == 1472
    assert_same_greedy(expected, warm)
    _assert_clean(engine)


def test_preemption_keeps_outputs_correct_and_releases_everything(engines):
    engine, baseline = engines
    prompts = [random_prompt(400, seed=300 + i) for i in range(6)]
    expected = _expected(baseline, prompts, 120)
    resumed_before = engine.call("connector_state")["totals"]["resumed_requests"]
    outputs = engine.generate(prompts, max_tokens=120, logprobs=5)  # 6 x ~16 blocks > 64: preemption
    for want, got in zip(expected, outputs, strict=True):
        assert_same_greedy(want, got)
    state = _assert_clean(engine)
    assert state["totals"]["resumed_requests"] > resumed_before  # preemption really happened
