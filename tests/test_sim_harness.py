"""The simulation harness itself: a clean run passes and leaves nothing behind, and each kind of
wrong it exists to catch is caught, with a message that says where the wrong bytes came from."""

from __future__ import annotations

import pytest
from sim_harness import InvariantViolation, SimFactory, clear_lmcache_env
from sim_internals import worker_mover

from lmcache_connector.testing.tiny_model import random_prompt


@pytest.fixture
def make_sim(tmp_path, monkeypatch):
    clear_lmcache_env(monkeypatch)
    factory = SimFactory(tmp_path)
    yield factory
    factory.close()


def test_shared_documents_are_served_from_both_tiers_and_nothing_is_left_behind(make_sim):
    sim = make_sim(disk=True, prefix_caching=False, num_blocks=24, memory_chunks=3)  # preempts, evicts
    documents = [random_prompt(96, seed=d) for d in range(3)]
    for i in range(12):
        sim.add_request(documents[i % 3] + random_prompt(8, seed=100 + i), max_tokens=12)
    sim.run()
    assert sum(1 for hits in sim.external_tokens.values() if any(hits)) >= 6
    assert any("preempted" in event for events in sim.history.values() for event in events)
    sim.assert_clean()
    restarted = make_sim.restart(sim)
    req = restarted.add_request(documents[0] + [9], max_tokens=2)
    restarted.run()
    assert restarted.hit_tokens(req) == 96  # from disk, after a restart
    restarted.assert_clean()


def test_a_reported_load_failure_is_recomputed_not_flagged(make_sim):
    sim = make_sim(prefix_caching=False)
    document = random_prompt(64, seed=1)
    sim.add_request(document, max_tokens=1)
    sim.run()
    sim.faults.fail_next_loads(1)
    req = sim.add_request(document + [9], max_tokens=3)
    sim.run()
    assert sim.load_errors[req] == 1 and sim.excused  # read wrong KV, told vLLM, recomputed
    assert sim.finished[req] == "FINISHED_LENGTH_CAPPED"
    sim.assert_clean()


def test_a_load_into_the_wrong_blocks_is_caught_and_explained(make_sim):
    sim = make_sim(prefix_caching=False)
    document = random_prompt(64, seed=1)
    sim.add_request(document, max_tokens=1)
    sim.run()
    mover = worker_mover(sim.workers[0])
    load = mover.load
    mover.load = lambda src, block_ids, slot=None: load(src, block_ids[::-1], slot=slot)
    sim.add_request(document + [9], max_tokens=1)
    with pytest.raises(InvariantViolation, match=r"holds the KV of request r0 position \d+; .* a connector load"):
        sim.run()


def test_a_slot_overwritten_under_a_queued_disk_write_is_caught(make_sim):
    sim = make_sim(disk=True, prefix_caching=False)
    submit = sim.faults.submit_deferred_writes

    def scribble_then_submit(rank):
        for _, _, _, regions in sim.faults.deferred_writes.get(rank, ()):
            regions[0][0] ^= 0xFF  # the slot changes after its write was queued
        submit(rank)

    sim.faults.submit_deferred_writes = scribble_then_submit
    sim.add_request(random_prompt(40, seed=1), max_tokens=1)
    with pytest.raises(InvariantViolation, match="disk writer read the slot of store 0 .* after it was overwritten"):
        sim.run()
