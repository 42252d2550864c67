"""The peer tier behind the tier contract: what the scheduler side publishes and answers, and what a
worker rank serves and fetches (the pieces under them are tested in test_peer_*.py; two instances
in test_sim_peer.py, two vLLM engines in test_vllm_p2p.py)."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from peer_support import NAMESPACE, REGIONS, ROW, TOKEN, PoolSource, counts_reaching, free_ports, make_chunk

from lmcache_connector.tiers.base import PENDING, ChunkMiss, HeldChange, StoredChunk
from lmcache_connector.tiers.peer.addresses import InstanceId, PeerAddress
from lmcache_connector.tiers.peer.catalog import PeerCatalog
from lmcache_connector.tiers.peer.client import PeerClient
from lmcache_connector.tiers.peer.registry import PeerChunk
from lmcache_connector.tiers.peer.store import PeerStore, TierSource


class FakePublisher:
    def __init__(self):
        self.held: dict[bytes, tuple[bytes, ...]] = {}
        self.log: list[tuple[str, bytes]] = []

    def publish(self, key, block_fps):
        self.held[key] = tuple(block_fps)
        self.log.append(("publish", key))

    def withdraw(self, key):
        self.held.pop(key, None)
        self.log.append(("withdraw", key))

    def take_counts(self):
        return {"registry_published": 3}


class FakeView:
    def __init__(self, answer=None):
        self.answer = answer
        self.forgotten: list[bytes] = []

    def poll(self):
        pass

    def best_piece(self, block_fps):
        return self.answer

    def forget(self, key, holder=None):
        self.forgotten.append(key)

    def up(self):
        return True

    def take_counts(self):
        return {"registry_failures": 2}


FPS = tuple(os.urandom(16) for _ in range(4))
KEY = FPS[-1]


def catalog(view=None) -> tuple[PeerCatalog, FakePublisher]:
    publisher = FakePublisher()
    return PeerCatalog(view or FakeView(), publisher), publisher


def test_the_peer_tier_is_an_asynchronous_tier_between_disk_and_remote_counted_as_p2p_and_never_written():
    tier, _ = catalog()
    assert (tier.name, tier.order, tier.hit_source) == ("peer", 20, "p2p")
    assert tier.asynchronous and tier.learns_by_asking and tier.watches_holdings
    assert not tier.accepts_writes() and tier.event_medium is None


def test_a_hit_names_every_live_holder_as_where_to_fetch_it():
    holders = (
        InstanceId(PeerAddress("10.0.0.5", 8200), "0a0b0c0d"),
        InstanceId(PeerAddress("10.0.0.6", 8200), "01020304"),
    )
    tier, _ = catalog(FakeView((PeerChunk(StoredChunk(KEY, FPS), holders), 3)))
    chunk, n = tier.best_piece(FPS)
    assert (chunk.key, chunk.block_fps, n) == (KEY, FPS, 3)
    assert chunk.sources == ("10.0.0.5:8200/0a0b0c0d", "10.0.0.6:8200/01020304")
    assert catalog(FakeView(PENDING))[0].best_piece(FPS) is PENDING
    assert catalog(FakeView(None))[0].best_piece(FPS) is None


def test_holders_a_worker_skips_are_left_out_of_answers_until_their_window_ends():
    """A worker that found a holder bad skips it for a while and says so (``skip_source``): the
    scheduler plans no fill from it meanwhile, rather than one that would fail at once."""
    holders = (
        InstanceId(PeerAddress("10.0.0.5", 8200), "0a0b0c0d"),
        InstanceId(PeerAddress("10.0.0.6", 8200), "01020304"),
    )
    tier, _ = catalog(FakeView((PeerChunk(StoredChunk(KEY, FPS), holders), 4)))
    tier.skip_source(str(holders[0]), 0.2)
    assert tier.best_piece(FPS)[0].sources == (str(holders[1]),)  # the other holder still serves it
    tier.skip_source(str(holders[1]), 0.2)
    assert tier.best_piece(FPS) is None  # only skipped holders: a miss (the next tier, or a recompute)
    time.sleep(0.25)
    tier.poll()
    chunk, n = tier.best_piece(FPS)
    assert chunk.sources == tuple(str(h) for h in holders) and n == 4  # both tried again


def test_a_chunk_is_published_once_held_and_withdrawn_only_when_neither_memory_nor_disk_holds_it():
    tier, publisher = catalog()
    tier.holdings_changed([("memory", HeldChange(KEY, True, block_fps=FPS))])
    tier.holdings_changed([("disk", HeldChange(KEY, True, block_fps=FPS))])
    assert publisher.log == [("publish", KEY)] and publisher.held[KEY] == FPS
    tier.holdings_changed([("memory", HeldChange(KEY, False))])  # evicted from memory, still on disk
    assert KEY in publisher.held
    tier.holdings_changed([("disk", HeldChange(KEY, False))])
    assert publisher.log[-1] == ("withdraw", KEY) and not publisher.held and tier.held() == 0


def test_a_chunk_gone_again_before_it_was_published_is_never_published():
    tier, publisher = catalog()
    tier.holdings_changed([("memory", HeldChange(KEY, True)), ("memory", HeldChange(KEY, False))])
    assert publisher.log == []


def test_a_reset_withdraws_everything_and_a_bad_fill_forgets_the_chunk():
    view = FakeView()
    tier, publisher = catalog(view)
    others = [tuple(os.urandom(16) for _ in range(2)) for _ in range(3)]
    tier.holdings_changed([("memory", HeldChange(fps[-1], True, block_fps=fps)) for fps in others])
    tier.clear()
    assert not publisher.held and tier.held() == 0
    tier.forget(KEY)
    assert view.forgotten == [KEY]
    assert tier.take_counts() == {"remote_failures": 2}  # the publisher's own counts are not exported


# ---------------------------------------------------------------- worker side


class FakeDisk:
    def __init__(self, chunks):
        self.chunks = {c.key: c for c in chunks}

    def read_into(self, key, block_fps, regions):
        chunk = self.chunks.get(key)
        if chunk is None or chunk.block_fps != tuple(block_fps):
            raise ChunkMiss("no such file")
        n = len(block_fps)
        for i, region in enumerate(regions):
            region[:] = chunk.data[i * n * ROW : (i + 1) * n * ROW]


def shape(n: int) -> tuple[int, int, int]:
    return (REGIONS, n, ROW)


def test_a_rank_serves_its_memory_first_then_its_disk():
    in_memory, on_disk = make_chunk(), make_chunk(3)
    pool = PoolSource()
    pool.add(in_memory)
    source = TierSource(pool.table, FakeDisk([on_disk]), shape)
    for chunk in (in_memory, on_disk):
        copy = source.read(chunk.key, chunk.block_fps, lambda n: memoryview(bytearray(n)))
        assert copy is not None and copy.shape == chunk.shape and bytes(copy.data) == chunk.data
    assert source.read(make_chunk().key, make_chunk().block_fps, lambda n: memoryview(bytearray(n))) is None
    assert TierSource(pool.table, None, shape).read(on_disk.key, on_disk.block_fps, bytearray) is None


def _store(port: int, token: bytes | None = TOKEN) -> PeerStore:
    client = PeerClient(NAMESPACE, 0, 0, token=token)
    return PeerStore(client, 0, PeerAddress("127.0.0.1", port), shape, timeout_s=2.0, token=token)


@contextmanager
def _holder_and(chunk, token: bytes | None = TOKEN) -> Iterator[tuple[PeerStore, PeerStore, str]]:
    """A rank serving ``chunk`` from its memory slots, another rank (holding ``token``) to fetch
    it, and the serving instance as a plan names it (a source)."""
    pool = PoolSource()
    pool.add(chunk)
    port = free_ports(1)
    serving = _store(port)
    serving.attach(pool.table, {})
    fetching = _store(free_ports(1), token=token)
    try:
        yield serving, fetching, f"127.0.0.1:{port}/0a0b0c0d"
    finally:
        serving.close(1)
        fetching.close(1)


def test_a_rank_fetches_a_chunk_from_the_same_rank_of_a_holder_and_misses_without_one():
    chunk = make_chunk()
    with _holder_and(chunk) as (serving, fetching, holder):
        buffer = bytearray(len(chunk.data))
        regions = [
            memoryview(buffer)[i * len(buffer) // REGIONS : (i + 1) * len(buffer) // REGIONS] for i in range(REGIONS)
        ]
        fetching.read_into(chunk.key, chunk.block_fps, regions, sources=[holder])
        assert bytes(buffer) == chunk.data
        served = {"served_chunks.peer": 1, "served_bytes.peer": len(chunk.data)}
        assert counts_reaching(serving.take_counts, **served) == served
        with pytest.raises(ChunkMiss):
            fetching.read_into(chunk.key, chunk.block_fps, regions, sources=["not an instance"])
        with pytest.raises(ChunkMiss):
            fetching.read_into(make_chunk().key, make_chunk().block_fps, regions, sources=[holder])


def test_a_wrong_token_gets_no_chunk():
    chunk = make_chunk()
    with _holder_and(chunk, token=b"another-token-of-someone-else-0123") as (serving, intruder, holder):
        buffer = bytearray(len(chunk.data))
        with pytest.raises(ChunkMiss):
            intruder.read_into(chunk.key, chunk.block_fps, [memoryview(buffer)], sources=[holder])
        assert intruder.take_counts() == {"remote_failures": 1} and not serving.take_counts()


def test_a_port_in_use_is_one_error_and_the_rank_still_fetches(caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        store = _store(taken.getsockname()[1])
        with caplog.at_level(logging.ERROR, logger="lmcache_connector"):
            store.attach(PoolSource().table, {})
        assert store.server is None
        assert "serves none" in caplog.text
        store.close(1)
