"""A repeated or shared prompt prefix is loaded from the connector instead of recomputed.

vLLM's own prefix caching is off in these engines, so every cached token reported by vLLM
(``num_cached_tokens``) provably came from the connector.
"""

from __future__ import annotations

import pytest
from vllm_support import assert_same_greedy, start_engine

from lmcache_connector.testing.tiny_model import SMALL_MHA, TINY, random_prompt

# (model, dtype, block size, chunk size): two shapes (GQA and MHA), two block sizes, two dtypes.
CONFIGS = {
    "tiny-bf16-b32": (TINY, "bfloat16", 32, 128),
    "mha-fp32-b64": (SMALL_MHA, "float32", 64, 256),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def setup(request, engine_tmp):
    shape, dtype, block, chunk = CONFIGS[request.param]
    engine = start_engine(shape, engine_tmp, dtype=dtype, block_size=block, extra_config={"chunk_size": chunk})
    baseline = start_engine(shape, engine_tmp, connector=False, dtype=dtype, block_size=block)
    yield engine, baseline, shape, dtype, block
    engine.close()
    baseline.close()


def _one(engine, prompt, max_tokens=12):
    return engine.generate([prompt], max_tokens=max_tokens, logprobs=5)[0]


def _compare(dtype, expected, actual):
    if dtype == "float32":
        assert actual["token_ids"] == expected["token_ids"]
    else:
        assert_same_greedy(expected, actual)


@pytest.mark.parametrize("length", [701, 704])  # not block-aligned, and block-aligned for both block sizes
def test_repeated_prompt_is_served_from_the_memory_tier(setup, length):
    engine, baseline, shape, dtype, block = setup
    prompt = random_prompt(length, seed=length, vocab_size=shape.vocab_size)
    reference = _one(baseline, prompt)
    cold = _one(engine, prompt)
    warm = _one(engine, prompt)

    assert cold["num_cached_tokens"] == 0
    # Every whole block is reused, leaving at least one token to compute.
    assert warm["num_cached_tokens"] == min(length // block * block, length - 1)
    assert cold["token_ids"] == reference["token_ids"]
    _compare(dtype, reference, warm)


def test_shared_prefix_hits_exactly_the_shared_whole_blocks(setup):
    engine, baseline, shape, dtype, block = setup
    document = random_prompt(900, seed=11, vocab_size=shape.vocab_size)
    _one(engine, document)
    for shared in (450, 300, block * 3 + 1):
        prompt = document[:shared] + random_prompt(200, seed=shared, vocab_size=shape.vocab_size)
        out = _one(engine, prompt)
        assert out["num_cached_tokens"] == shared // block * block, f"shared={shared}"
        _compare(dtype, _one(baseline, prompt), out)


def test_unrelated_prompt_hits_nothing(setup):
    engine, _, shape, _, _ = setup
    _one(engine, random_prompt(600, seed=21, vocab_size=shape.vocab_size))
    out = _one(engine, random_prompt(600, seed=22, vocab_size=shape.vocab_size))
    assert out["num_cached_tokens"] == 0


def test_load_failure_is_recomputed_not_a_crash(setup):
    engine, baseline, shape, dtype, _ = setup
    prompt = random_prompt(800, seed=31, vocab_size=shape.vocab_size)
    _one(engine, prompt)
    engine.call("fail_next_loads", count=1)
    out = _one(engine, prompt)  # the first chunk fails to load: vLLM must recompute, not fail
    _compare(dtype, _one(baseline, prompt), out)
    again = _one(engine, prompt)  # the cache keeps serving afterwards
    assert again["num_cached_tokens"] > 0
    _compare(dtype, _one(baseline, prompt), again)


def test_nothing_is_left_pinned_or_tracked_between_requests(setup):
    engine, *_ = setup
    state = engine.call("connector_state")
    assert state["pins"] == 0
    assert state["inflight"] == 0
    assert state["tracked_requests"] == 0
    assert state["stored_bytes"] <= state["used_slots"] * state["slot_bytes"]


def test_wrong_bytes_in_the_tier_change_the_output(setup):
    """Negative control: the loaded bytes are what attention reads (so correct outputs mean something)."""
    engine, baseline, shape, _, _ = setup
    prompt = random_prompt(700, seed=41, vocab_size=shape.vocab_size)
    _one(engine, prompt)
    engine.call("corrupt_pool", seed=1)
    corrupted = _one(engine, prompt)
    assert corrupted["num_cached_tokens"] > 0
    assert corrupted["token_ids"] != _one(baseline, prompt)["token_ids"]
    engine.call("reset_prefix_cache", reset_connector=True)
    assert _one(engine, prompt)["num_cached_tokens"] == 0
