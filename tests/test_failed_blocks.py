"""Blocks whose load failed stay known as wrong until a forward rewrites them (plain integers)."""

from __future__ import annotations

from lmcache_connector.failed_blocks import FailedBlocks, StepAccess

BS = 16


def test_a_sharer_reading_a_failed_block_nobody_rewrites_is_reported():
    failed = FailedBlocks(BS)
    failed.add({5})
    # The request that loaded block 5 was preempted; its sharer reads blocks 4 and 5 and writes block 6.
    flagged = failed.check_step([StepAccess("sharer", [4, 5, 6], read_end=2 * BS, write_end=2 * BS + 3)])
    assert flagged == {"sharer": [5]}
    assert failed.blocks == {5}  # still wrong: nothing rewrote it


def test_a_block_rewritten_in_the_same_step_counts_as_good_for_its_readers():
    failed = FailedBlocks(BS)
    failed.add({5})
    accesses = [
        StepAccess("loader", [4, 5], read_end=BS, write_end=2 * BS),  # rewound to block 5: rewrites it
        StepAccess("sharer", [4, 5, 6], read_end=2 * BS, write_end=2 * BS + 3),
    ]
    assert failed.check_step(accesses) == {}
    assert failed.blocks == set()


def test_a_partly_rewritten_block_is_still_read_as_it_was():
    failed = FailedBlocks(BS)
    failed.add({5})
    # Tokens [16, 20) of block 5 were computed before: writing [20, 32) does not make them right.
    assert failed.check_step([StepAccess("r", [4, 5], read_end=BS + 4, write_end=2 * BS)]) == {"r": [5]}


def test_a_block_rewritten_by_a_flagged_request_stays_wrong():
    failed = FailedBlocks(BS)
    failed.add({1})
    accesses = [
        StepAccess("a", [1, 2], read_end=BS, write_end=2 * BS),  # reads wrong block 1, rewrites block 2
        StepAccess("b", [3, 2, 7], read_end=2 * BS, write_end=2 * BS + 1),  # reads block 2, which a rewrote
    ]
    failed.add({2})
    assert failed.check_step(accesses) == {"a": [1], "b": [2]}
    assert failed.blocks == {1, 2}
