"""Scenarios on the simulation harness (vLLM's real scheduler, the connector's two real halves, a
simulated model): each builds one known way for wrong KV to reach attention, for a request to
fail, or for the cache to lose a good chunk, and asserts it does not happen. The harness checks
that every position a request attends to holds its own KV on every step; these tests add what a
user would notice on top (hits, errors, leaks)."""

from __future__ import annotations

import pytest
import torch
from sim_harness import SimFactory, clear_lmcache_env
from sim_internals import connector_state, scheduler_half

from lmcache_connector.testing.tiny_model import random_prompt


@pytest.fixture
def make_sim(tmp_path, monkeypatch):
    clear_lmcache_env(monkeypatch)
    factory = SimFactory(tmp_path)
    yield factory
    factory.close()


def _store(sim, tokens, max_tokens=1):
    """Serve one request to the end (its chunks get stored) and let background writes report."""
    req_id = sim.add_request(list(tokens), max_tokens=max_tokens)
    sim.run()
    sim.settle()
    return req_id


def test_load_never_reads_a_slot_before_its_disk_promotion_ran(make_sim):
    # Memory holds two chunks. Another request's stores evict both of A's chunks from memory (they
    # stay on disk), then A is preempted. Resuming, A promotes its first chunk K from disk into a
    # slot just freed by eviction; a new request B admitted in the same step matches K (the
    # promotion's entry) and loads from that slot. The plan lists new requests before resumed ones.
    sim = make_sim(disk=True, prefix_caching=False, memory_chunks=2)
    chunk_k = random_prompt(32, seed=1)
    sim.add_request(chunk_k + random_prompt(32, seed=2), max_tokens=40)
    for _ in range(3):
        sim.step()
    sim.add_request(random_prompt(64, seed=3), max_tokens=1)  # evicts both of A's chunks from memory
    for _ in range(4):
        sim.step()
    sim.preempt_running()
    sim.add_request(chunk_k + random_prompt(32, seed=4), max_tokens=3)
    sim.run()
    sim.assert_clean()


def test_stores_computed_on_blocks_whose_load_failed_never_become_hits(make_sim):
    # A loads document D and the load fails; B, admitted later in the same step, shares A's
    # blocks through vLLM's prefix cache (it caches sync-load blocks at allocation) and computes
    # its own chunk on top of them. That chunk is wrong and must be neither kept nor written.
    sim = make_sim(disk=True, prefix_caching=True, memory_chunks=8)
    document, tail_b = random_prompt(64, seed=1), random_prompt(32, seed=3)
    _store(sim, document + random_prompt(8, seed=9))
    assert sim.scheduler.reset_prefix_cache()
    sim.faults.fail_next_loads(1)
    a = sim.add_request(document + random_prompt(32, seed=2), max_tokens=3)
    b = sim.add_request(document + tail_b, max_tokens=3)
    sim.step()
    assert sim.hit_tokens(a) == 64 and sim.load_errors[a] and sim.load_errors[b], "the scenario did not happen"
    sim.run()
    sim.assert_clean()
    sim.replay([document + tail_b])  # whatever memory kept is loaded and read under the invariant
    restarted = make_sim.restart(sim)
    restarted.replay([document + tail_b])  # and what the disk kept, after a restart
    assert not restarted.errors()


def test_blocks_of_a_failed_load_never_come_back_from_vllms_prefix_cache(make_sim):
    # vLLM caches a sync load's blocks when it allocates them; when the load fails it recomputes
    # them (kv_load_failure_policy=recompute) but leaves them in its prefix cache. Preempted before
    # recomputing, the request is readmitted on a local hit of those never-filled blocks.
    sim = make_sim(prefix_caching=True, num_blocks=8)  # 7 usable blocks
    document = random_prompt(64, seed=1)
    _store(sim, document + [5])
    assert sim.scheduler.reset_prefix_cache()
    decoding = sim.add_request(random_prompt(16, seed=7), max_tokens=24)
    while sim.requests[decoding].num_computed_tokens < 31:  # its step after next needs a new block
        sim.step()
    sim.faults.fail_next_loads(1)
    req = sim.add_request(document + random_prompt(16, seed=2), max_tokens=4)
    sim.step()
    sim.step()
    assert sim.load_errors[req] and "preempted" in sim.history[req][-1], "the scenario did not happen"
    sim.run()
    sim.assert_clean()


def test_prompt_embeddings_never_share_kv_with_other_embeddings(make_sim):
    # Two prompts with the same placeholder token ids but different embeddings at those positions.
    sim = make_sim(enable_prompt_embeds=True)
    n = 64
    tokens = random_prompt(n, seed=1)
    is_token = [i % 4 != 1 for i in range(n)]
    placeholders = [t if keep else 0 for t, keep in zip(tokens, is_token, strict=True)]
    gen = torch.Generator().manual_seed(0)
    first, second = (torch.randn(n, 64, generator=gen).half() for _ in range(2))
    sim.add_request(placeholders, max_tokens=2, embeds=first, is_token=is_token)
    sim.run()
    other = sim.add_request(placeholders, max_tokens=2, embeds=second, is_token=is_token)
    sim.run()
    assert sim.hit_tokens(other) == 0
    sim.assert_clean()


@pytest.mark.parametrize(
    "hook, method", [("update_state_after_alloc", "after_alloc"), ("build_connector_meta", "build_plan")]
)
def test_a_failing_plan_after_a_promised_hit_is_recomputed(make_sim, hook, method):
    # vLLM was promised a hit (get_num_new_matched_tokens); then planning its load (the planner's
    # method behind vLLM's ``hook``) raises. The promised blocks must be reported as load errors so
    # vLLM recomputes them.
    sim = make_sim()
    document = random_prompt(64, seed=1)
    _store(sim, document + [5, 6])
    assert sim.scheduler.reset_prefix_cache()
    sim.faults.raise_once(scheduler_half(sim.connector), method)
    req = sim.add_request(document + [9, 9, 9], max_tokens=2)
    sim.run()
    assert sim.faults.fired == [method] and sim.hit_tokens(req) == 64
    sim.assert_clean()


def test_disk_promotions_never_evict_the_same_requests_memory_chunks(make_sim):
    # A document's first chunk is only on disk, its later chunks in memory. Promoting the first
    # must not evict the others the same load reads, or the hit fails (here: the request fails).
    sim = make_sim(disk=True, prefix_caching=False, memory_chunks=4, load_failure_policy="fail")
    document = random_prompt(96, seed=1)  # three chunks
    _store(sim, document)
    _store(sim, random_prompt(32, seed=2))
    _store(sim, random_prompt(32, seed=3))  # memory is full: the document's first chunk goes
    req = sim.add_request(document + random_prompt(16, seed=4), max_tokens=2)
    sim.run()
    assert not sim.errors(), f"requests failed: {sim.errors()}"
    assert sim.hit_tokens(req) == 96
    sim.assert_clean()


def test_a_worker_that_disabled_itself_stops_matching_and_storing(make_sim, monkeypatch):
    from lmcache_connector.ops.paged_kv import PagedKV

    def unsupported(cls, kv_caches):
        raise ValueError("unsupported KV cache layout (injected)")

    monkeypatch.setattr(PagedKV, "from_layer_views", classmethod(unsupported))
    sim = make_sim(prefix_caching=False)
    document = random_prompt(64, seed=1)
    later = []
    for i in range(3):
        req = sim.add_request(document + random_prompt(8, seed=10 + i), max_tokens=2)
        sim.run()
        later.append(req)
    assert [sim.hit_tokens(r) for r in later[1:]] == [0, 0], "the scheduler still promises hits"
    assert not any(sim.load_errors.values()), f"loads failed: {dict(sim.load_errors)}"
    sim.assert_clean()


def test_tensor_parallel_slot_is_released_only_when_every_rank_reported(make_sim):
    # Rank 0's store of a chunk fails while rank 1's disk write of it is still queued. The slot
    # must stay reserved until rank 1 reported, or the next store overwrites what rank 1 writes.
    sim = make_sim(tp=2, disk=True, prefix_caching=False, memory_chunks=1)
    sim.faults.hold_disk_writes(rank=1)
    sim.faults.fail_next_stores(1, rank=0)
    sim.add_request(random_prompt(33, seed=1), max_tokens=6)
    sim.step()
    sim.step()
    sim.add_request(random_prompt(33, seed=2), max_tokens=2)
    sim.step()
    sim.faults.release_disk_writes(rank=1)
    sim.run()
    assert sim.faults.fired == ["store failure on rank 0"]
    sim.assert_clean()


def test_a_skipped_promotion_keeps_its_good_file(make_sim):
    # The document's first chunk is in memory (and on disk), its second only on disk. The load of
    # the first fails, so the promotion of the second is skipped; its file is fine, and the next
    # request must still get it.
    sim = make_sim(disk=True, prefix_caching=False, memory_chunks=2)
    document = random_prompt(64, seed=1)
    _store(sim, document)
    _store(sim, document[:32] + random_prompt(32, seed=2))  # keeps chunk 0 recent, evicts chunk 1
    sim.faults.fail_next_loads(1)
    failed = sim.add_request(document + random_prompt(16, seed=3), max_tokens=4)
    sim.step()
    assert sim.load_errors[failed], "the scenario did not happen"
    sim.abort(failed)  # the client went away: nothing is recomputed or stored again
    sim.run()
    req = sim.add_request(document + random_prompt(16, seed=4), max_tokens=2)
    sim.run()
    assert sim.hit_tokens(req) == 64
    sim.assert_clean()


@pytest.mark.parametrize("disk", [False, True], ids=["memory", "memory+disk"])
def test_reset_prefix_cache_with_connector_forgets_every_chunk(make_sim, disk):
    sim = make_sim(disk=disk, prefix_caching=True)
    document = random_prompt(96, seed=1)
    _store(sim, document + [7])
    assert sim.scheduler.reset_prefix_cache(reset_connector=True)
    req = sim.add_request(document + [8], max_tokens=2)
    sim.run()
    assert sim.hit_tokens(req) == 0
    sim.assert_clean()


def test_writes_that_land_after_the_last_request_are_reported_without_another_request(make_sim):
    # vLLM's serving loop steps while scheduler.has_requests(), which asks the connector
    # (has_pending_push_work) once no request is left. A chunk file that lands after the request's
    # last step must reach the disk catalog through those empty steps, not wait for a next request.
    sim = make_sim(disk=True, prefix_caching=False)
    sim.faults.hold_disk_writes(rank=0)
    req = sim.add_request(random_prompt(40, seed=1), max_tokens=2)
    while req in sim.requests:
        sim.step()
    sim.step()  # the step that tells the workers the request finished
    assert not sim.scheduler.has_unfinished_requests() and not sim.scheduler.has_finished_requests()
    assert sim.scheduler.has_requests(), "vLLM would go idle with the write unreported"
    assert connector_state(sim.connector)["disk_chunks"] == 0
    sim.faults.release_disk_writes(rank=0)
    sim.run()  # empty steps, as vLLM's loop runs them
    state = connector_state(sim.connector)
    assert (state["disk_chunks"], state["inflight"], state["pins"]) == (1, 0, 0)
    assert not sim.scheduler.has_requests()
