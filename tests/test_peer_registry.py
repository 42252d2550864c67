"""The P2P lookup registry against a real redis-server on loopback: publish, withdraw, every live
holder, block-granular lookups, expiry when an instance dies, a registry that restarts or hangs,
and the scheduler's local view that never waits on it (short TTLs here; Cluster:
``test_peer_registry_cluster.py``)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import redis_servers as rs
from peer_support import NAMESPACE, OTHER_NAMESPACE, PoolSource, make_chunk

from lmcache_connector.config import load_config
from lmcache_connector.tiers.base import PENDING, StoredChunk
from lmcache_connector.tiers.peer import publisher as publisher_module
from lmcache_connector.tiers.peer import view as view_module
from lmcache_connector.tiers.peer.addresses import InstanceId, PeerAddress
from lmcache_connector.tiers.peer.client import PeerClient
from lmcache_connector.tiers.peer.publisher import RegistryPublisher
from lmcache_connector.tiers.peer.registry import (
    PeerRegistry,
    connect_registry,
    entry_key,
    holders_key,
    live_key,
    registry_options,
)
from lmcache_connector.tiers.peer.server import PeerServer
from lmcache_connector.tiers.peer.view import PeerView
from lmcache_connector.tiers.remote.redis_client import RedisClient, RedisOptions
from lmcache_connector.urls import parse_redis_url

LIVE_TTL, HOLDER_TTL = 0.3, 0.8


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> rs.RedisServer:
    with rs.redis_server(tmp_path_factory.mktemp("registry")) as srv:
        yield srv


def connect(port: int, timeout: float = 0.5) -> RedisClient:
    options = RedisOptions(socket_timeout_secs=timeout, connect_timeout_secs=timeout)
    return connect_registry(parse_redis_url(f"127.0.0.1:{port}"), options)


@pytest.fixture
def registry(server) -> PeerRegistry:
    server.admin().flushall()
    reg = PeerRegistry(connect(server.port), NAMESPACE, live_ttl_s=LIVE_TTL, holder_ttl_s=HOLDER_TTL)
    yield reg
    reg.close()


def instance(port: int = 8200) -> InstanceId:
    return InstanceId.new(PeerAddress("127.0.0.1", port))


def stored(chunk) -> StoredChunk:
    return StoredChunk(chunk.key, chunk.block_fps)


def test_a_published_chunk_is_found_with_every_live_holder_but_the_asker(registry):
    a, b, c = instance(1), instance(2), instance(3)
    chunk = make_chunk()
    for who in (a, b, c):
        registry.heartbeat(who)
        registry.publish(who, [stored(chunk)])
    answers = registry.lookup([chunk.block_fps])
    assert answers[chunk.key].chunk == stored(chunk)
    assert set(answers[chunk.key].holders) == {a, b, c}
    assert set(registry.lookup([chunk.block_fps], exclude=c)[chunk.key].holders) == {a, b}
    assert set(registry.holders(chunk.key, exclude=a)) == {b, c}


def test_a_prompt_sharing_part_of_a_chunk_finds_each_whole_block_it_shares(registry):
    a = instance()
    chunk, unrelated = make_chunk(4), make_chunk(4)
    registry.heartbeat(a)
    registry.publish(a, [stored(chunk)])
    # A prompt that agrees on the first two blocks, then goes its own way.
    question = chunk.block_fps[:2] + unrelated.block_fps[2:]
    answers = registry.lookup([question])
    assert [answers[fp] is not None for fp in question] == [True, True, False, False]
    assert answers[question[1]].chunk == stored(chunk) and answers[question[1]].holders == (a,)
    # A prompt that ends inside the chunk finds it from the block entries too.
    assert registry.lookup([chunk.block_fps[:3]])[chunk.block_fps[2]].chunk == stored(chunk)


def test_a_withdrawn_chunk_is_no_longer_found_at_that_holder(registry):
    a, b = instance(1), instance(2)
    chunk = make_chunk()
    for who in (a, b):
        registry.heartbeat(who)
        registry.publish(who, [stored(chunk)])
    registry.withdraw(a, [chunk.key])
    assert registry.lookup([chunk.block_fps])[chunk.key].holders == (b,)
    registry.withdraw(b, [chunk.key])
    assert registry.lookup([chunk.block_fps])[chunk.key] is None


def test_another_namespace_never_sees_the_chunks(registry):
    a = instance()
    chunk = make_chunk()
    registry.heartbeat(a)
    registry.publish(a, [stored(chunk)])
    other = PeerRegistry(registry.redis, OTHER_NAMESPACE)
    assert all(answer is None for answer in other.lookup([chunk.block_fps]).values())


def test_a_member_without_a_heartbeat_is_no_holder_and_is_pruned(registry, server):
    alive, silent = instance(1), instance(2)
    chunk = make_chunk()
    registry.heartbeat(alive)
    registry.publish(alive, [stored(chunk)])
    registry.publish(silent, [stored(chunk)])  # never beat: dead
    name = holders_key("lmc:", NAMESPACE, chunk.key.hex())
    server.admin().sadd(name, "planted garbage")
    assert registry.lookup([chunk.block_fps])[chunk.key].holders == (alive,)
    assert server.admin().smembers(name) == {str(alive).encode()}


def test_planted_block_entries_name_nothing(registry, server):
    a = instance()
    chunk = make_chunk()
    registry.heartbeat(a)
    registry.publish(a, [stored(chunk)])
    admin = server.admin()
    admin.set(entry_key("lmc:", NAMESPACE, chunk.block_fps[0].hex()), "not an entry")
    other = make_chunk()  # an entry that names a chunk the block is not part of
    admin.set(entry_key("lmc:", NAMESPACE, chunk.block_fps[1].hex()), f"{other.key.hex()}:{other.key.hex()}")
    answers = registry.lookup([chunk.block_fps[:2] + make_chunk(2).block_fps])
    assert answers[chunk.block_fps[0]] is None and answers[chunk.block_fps[1]] is None


def test_a_dead_instance_stops_being_a_holder_within_live_ttl_and_its_keys_expire(registry, server):
    a = instance()
    chunk = make_chunk()
    publisher = RegistryPublisher(registry, a).start()
    publisher.publish(chunk.key, chunk.block_fps)
    assert publisher.flush()
    assert registry.lookup([chunk.block_fps])[chunk.key].holders == (a,)
    publisher.close(leave=False)  # killed: no goodbye
    time.sleep(LIVE_TTL * 1.25 + 0.02)
    assert registry.lookup([chunk.block_fps])[chunk.key] is None
    time.sleep(HOLDER_TTL - LIVE_TTL * 1.25)
    assert server.admin().keys("lmc:p2p:*") == []  # every key of the dead instance expired by itself


def test_a_live_instance_keeps_its_entries_past_the_holder_ttl(registry, server):
    a = instance()
    chunk = make_chunk()
    publisher = RegistryPublisher(registry, a).start()
    try:
        publisher.publish(chunk.key, chunk.block_fps)
        assert publisher.flush()
        time.sleep(HOLDER_TTL * 1.5)  # heartbeats and a re-publish at HOLDER_TTL / 2 keep it
        assert registry.lookup([chunk.block_fps])[chunk.key].holders == (a,)
    finally:
        publisher.close()
    assert registry.lookup([chunk.block_fps])[chunk.key] is None  # a clean shutdown leaves at once
    assert not server.admin().exists(live_key("lmc:", NAMESPACE, a))


def test_the_publisher_sends_the_last_word_on_each_chunk(registry):
    a = instance()
    kept, evicted = make_chunk(), make_chunk()
    publisher = RegistryPublisher(registry, a).start()
    try:
        publisher.publish(kept.key, kept.block_fps)
        publisher.publish(evicted.key, evicted.block_fps)
        publisher.withdraw(evicted.key)
        assert publisher.flush() and publisher.held() == 1
        answers = registry.lookup([kept.block_fps, evicted.block_fps])
        assert answers[kept.key].holders == (a,) and answers[evicted.key] is None
    finally:
        publisher.close()


def test_a_registry_that_restarts_empty_gets_every_entry_back(tmp_path: Path, monkeypatch, caplog):
    monkeypatch.setattr(publisher_module, "RETRY_FIRST_S", 0.05)
    chunk = make_chunk()
    a = instance()
    with rs.redis_server(tmp_path / "first") as first:
        port = first.port
        registry = PeerRegistry(connect(port), NAMESPACE, live_ttl_s=LIVE_TTL, holder_ttl_s=30)
        publisher = RegistryPublisher(registry, a).start()
        publisher.publish(chunk.key, chunk.block_fps)
        assert publisher.flush()
        with caplog.at_level(logging.WARNING, logger="lmcache_connector"):
            first.kill()
            deadline = time.monotonic() + 3
            while publisher.up() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not publisher.up()
            with rs.redis_server(tmp_path / "second", port=port):
                assert publisher.flush(timeout=3)
                time.sleep(0.05)
                assert registry.lookup([chunk.block_fps])[chunk.key].holders == (a,)
            publisher.close(leave=False)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([m for m in messages if "is down" in m]) == 1
    assert len([m for m in messages if m.endswith("is back")]) == 1


def test_the_registry_connects_with_the_settings_of_the_remote_tier(tmp_path: Path):
    password_file = tmp_path / "password"
    password_file.write_text("registry-password\n")
    with rs.redis_server(tmp_path / "secured", password="registry-password") as secured:
        env = {
            "LMCACHE_ENABLE_P2P": "True",
            "LMCACHE_LOOKUP_URL": f"127.0.0.1:{secured.port}",
            "LMCACHE_DISTRIBUTED_URL": "127.0.0.1:8200",
            "LMCACHE_REMOTE_PASSWORD_FILE": str(password_file),
            "LMCACHE_REMOTE_KEY_PREFIX": "team-a:",
        }
        config = load_config(env=env)
        options = registry_options(config)
        assert options.socket_timeout_secs == 1.0 and options.key_prefix == "team-a:"
        registry = PeerRegistry(connect_registry(config.parsed_lookup_url, options), NAMESPACE, options.key_prefix)
        try:
            a, chunk = instance(), make_chunk()
            registry.heartbeat(a)
            registry.publish(a, [stored(chunk)])
            assert registry.lookup([chunk.block_fps])[chunk.key].holders == (a,)
            assert secured.admin().exists(holders_key("team-a:", NAMESPACE, chunk.key.hex()))
        finally:
            registry.close()


# ---------------------------------------------------------------- the scheduler's local view


def test_the_view_answers_pending_then_every_holder_then_from_memory(registry, server):
    a = instance()
    chunk = make_chunk(4)
    registry.heartbeat(a)
    registry.publish(a, [stored(chunk)])
    view = PeerView(registry, own=None, lookup_timeout_s=2.0)
    try:
        deadline = time.monotonic() + 2
        answer = view.best_piece(chunk.block_fps)
        while answer is PENDING and time.monotonic() < deadline:
            time.sleep(0.005)
            view.poll()
            answer = view.best_piece(chunk.block_fps)
        piece, blocks = answer
        assert blocks == 4 and piece.chunk == stored(chunk) and piece.holders == (a,)
        # Block-granular: a prompt sharing two blocks gets a two-block piece of the chunk.
        view.prefetch(chunk.block_fps[:2] + make_chunk(2).block_fps, 4)
        time.sleep(0.05)
        view.poll()
        piece, blocks = view.best_piece(chunk.block_fps[:2] + make_chunk(2).block_fps)
        assert blocks == 2 and piece.chunk == stored(chunk)
        # Known answers come from memory: no round trip, even with the registry stopped.
        server.pause()
        try:
            started = time.monotonic()
            assert view.best_piece(chunk.block_fps)[1] == 4
            assert time.monotonic() - started < 0.1  # a round trip to the stopped registry would hang 0.5 s
        finally:
            server.resume()
        view.forget(chunk.key, holder=a)
        assert view.best_piece(chunk.block_fps) is None  # its only holder did not have it
    finally:
        view.close()


def test_the_view_never_excludes_nobody_but_itself(registry):
    a, me = instance(1), instance(2)
    chunk = make_chunk()
    for who in (a, me):
        registry.heartbeat(who)
        registry.publish(who, [stored(chunk)])
    view = PeerView(registry, own=me, lookup_timeout_s=2.0)
    try:
        view.prefetch(chunk.block_fps, 4)
        time.sleep(0.05)
        view.poll()
        assert view.best_piece(chunk.block_fps)[0].holders == (a,)
    finally:
        view.close()


def test_a_hung_registry_is_a_miss_at_once_and_comes_back(server, monkeypatch, caplog):
    monkeypatch.setattr(view_module.PeerView, "probe_first_s", 0.05)
    server.admin().flushall()
    registry = PeerRegistry(connect(server.port, timeout=0.2), NAMESPACE, live_ttl_s=LIVE_TTL, holder_ttl_s=HOLDER_TTL)
    view = PeerView(registry, own=None, lookup_timeout_s=0.05)
    chunk = make_chunk()
    try:
        with caplog.at_level(logging.WARNING, logger="lmcache_connector"):
            server.pause()
            try:
                started = time.monotonic()
                assert view.best_piece(chunk.block_fps) is PENDING
                assert time.monotonic() - started < 0.04  # a few ms at most, not the 50 ms deadline
                time.sleep(0.06)
                view.poll()
                assert view.best_piece(chunk.block_fps) is None and not view.up()
                assert view.best_piece(make_chunk().block_fps) is None  # down: no question at all
            finally:
                server.resume()
            deadline = time.monotonic() + 3
            while not view.up() and time.monotonic() < deadline:
                time.sleep(0.02)
                view.poll()
            assert view.up()
        messages = [r.getMessage() for r in caplog.records]
        assert len([m for m in messages if "is down" in m]) == 1
        assert len([m for m in messages if m.endswith("is back")]) == 1
        assert view.take_counts() == {"registry_failures": 1}
    finally:
        view.close()
        registry.close()


# ---------------------------------------------------------------- the pieces together


def test_a_chunk_found_in_the_registry_is_fetched_from_its_holder(registry):
    """Instance A serves and publishes a chunk; instance B, with nothing of its own, looks it up in
    its view and fetches it from A into its buffers."""
    chunk = make_chunk()
    source = PoolSource()
    source.add(chunk)
    peer_server = PeerServer(source, NAMESPACE, 0, 0, PeerAddress("127.0.0.1", 0)).start()
    a = InstanceId.new(peer_server.address)
    publisher = RegistryPublisher(registry, a).start()
    view = PeerView(registry, own=InstanceId.new(PeerAddress("127.0.0.1", 1)), lookup_timeout_s=2.0)
    client = PeerClient(NAMESPACE, tp_rank=0)
    try:
        publisher.publish(chunk.key, chunk.block_fps)
        assert publisher.flush()
        view.prefetch(chunk.block_fps, 4)
        time.sleep(0.05)
        view.poll()
        piece, blocks = view.best_piece(chunk.block_fps)
        holder = piece.holders[0].address.for_rank(0)
        want, buffer = chunk.want()
        assert client.fetch(holder, [want], timeout_s=2).found == [True] and bytes(buffer) == chunk.data
    finally:
        client.close()
        view.close()
        publisher.close()
        peer_server.close()
