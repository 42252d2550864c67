"""The tier contract, proven with a medium defined outside the package (``dict_medium``) and
registered through the extension point, under the simulation harness (vLLM's real scheduler, the
connector's real halves, KV checked on every forward). Nothing in ``connector/`` knows this medium.

What the contract promises, one test each: hits from the secondary after memory evicted a chunk,
asynchronous fills through vLLM's WAITING_FOR_REMOTE_KVS path, a catalog that answers "pending",
stale catalog entries (a miss and a recompute, never an error) and failing reads.
"""

from __future__ import annotations

import dict_medium
import pytest
from sim_harness import SimFactory, clear_lmcache_env

from lmcache_connector.testing.tiny_model import random_prompt
from lmcache_connector.tiers.registry import EXTRA_TIERS_ENV, media

DOCUMENT_TOKENS = 128  # 4 chunks of 32 tokens: the memory tier holds one document


@pytest.fixture
def make_sim(tmp_path, monkeypatch):
    clear_lmcache_env(monkeypatch)
    monkeypatch.setenv(EXTRA_TIERS_ENV, "dict_medium:DictMedium")
    for name in (
        "DICT_TIER_DELAY_S",
        "DICT_TIER_FAIL_RATE",
        "DICT_TIER_ASYNC",
        "DICT_TIER_PENDING",
        "DICT_TIER_READ_CONCURRENCY",
    ):
        monkeypatch.delenv(name, raising=False)
    dict_medium.forget_everything()
    factory = SimFactory(tmp_path)

    def make(**env: str):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return factory(prefix_caching=False, memory_chunks=4)

    yield make
    factory.close()
    dict_medium.forget_everything()


def _serve(sim, tokens, max_tokens=2) -> str:
    req_id = sim.add_request(list(tokens), max_tokens=max_tokens)
    sim.run()
    return req_id


def _document_then_others(sim, seed: int = 1) -> list[int]:
    """Store a document (written behind to the dict tier), then push it out of the memory tier."""
    document = random_prompt(DOCUMENT_TOKENS, seed=seed)
    _serve(sim, document + [5, 6])
    _serve(sim, random_prompt(DOCUMENT_TOKENS, seed=seed + 100) + [5, 6])
    return document


def test_the_medium_is_registered_from_outside_the_package():
    assert [m.name for m in media("dict_medium:DictMedium")] == ["disk", "peer", "remote", "dict"]
    with pytest.raises(ValueError, match="module:factory"):
        media("dict_medium")
    with pytest.raises(ValueError, match="cannot import"):
        media("no_such_module:Medium")


def test_chunks_evicted_from_memory_are_served_from_the_secondary(make_sim):
    sim = make_sim()
    document = _document_then_others(sim)
    again = _serve(sim, document + [7, 8, 9])
    assert sim.hit_tokens(again) == DOCUMENT_TOKENS
    assert dict_medium.STATS["reads"] >= 2  # two of the four chunks were only in the dict tier
    sim.assert_clean()


def test_asynchronous_fills_load_in_the_background(make_sim):
    sim = make_sim(DICT_TIER_ASYNC="1", DICT_TIER_DELAY_S="0.005")
    document = _document_then_others(sim)
    again = _serve(sim, document + [7, 8, 9])
    # Promised once, as an asynchronous load (vLLM parks the request until every rank reported it
    # finished), then admitted again with its blocks loaded: nothing more to ask the connector for.
    assert sim.external_tokens[again] == [DOCUMENT_TOKENS, 0]
    assert sum("admitted" in event for event in sim.history[again]) == 2
    assert dict_medium.STATS["reads"] == 4
    sim.assert_clean()


def test_a_store_that_allows_it_reads_a_loads_chunks_at_once(make_sim):
    sim = make_sim(DICT_TIER_ASYNC="1", DICT_TIER_DELAY_S="0.05", DICT_TIER_READ_CONCURRENCY="4")
    document = _document_then_others(sim)
    again = _serve(sim, document + [7, 8, 9])
    assert sim.external_tokens[again] == [DOCUMENT_TOKENS, 0]
    assert dict_medium.STATS["reads"] == 4 and dict_medium.STATS["most_reading"] > 1
    sim.assert_clean()  # the KV of every loaded block checked, as always


def test_a_pending_catalog_makes_vllm_ask_again(make_sim):
    sim = make_sim(DICT_TIER_PENDING="3")
    document = _document_then_others(sim)
    again = _serve(sim, document + [7, 8, 9])
    assert dict_medium.STATS["pending_answers"] >= 2
    assert sim.hit_tokens(again) == DOCUMENT_TOKENS
    sim.assert_clean()


def test_stale_entries_are_misses_and_recomputes(make_sim):
    sim = make_sim()
    document = _document_then_others(sim)
    assert dict_medium.delete_behind_the_catalogs_back() > 0
    _serve(sim, document + [7, 8, 9])  # promised from the stale catalog, read finds nothing: recompute
    assert not sim.errors()
    sim.assert_clean()


@pytest.mark.parametrize("asynchronous,readers", [("0", "1"), ("1", "1"), ("1", "4")])
def test_failing_reads_never_put_wrong_kv_in_attention(make_sim, asynchronous, readers):
    sim = make_sim(
        DICT_TIER_FAIL_RATE="0.5",
        DICT_TIER_ASYNC=asynchronous,
        DICT_TIER_SEED="3",
        DICT_TIER_READ_CONCURRENCY=readers,
    )
    documents = [random_prompt(DOCUMENT_TOKENS, seed=s) for s in range(3)]
    for round_ in range(3):
        for i, document in enumerate(documents):
            _serve(sim, document + [round_, i, 9])
    assert dict_medium.STATS["failed_reads"] > 0
    assert not sim.errors()
    sim.assert_clean()
