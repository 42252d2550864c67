"""The ``lm://`` client against LMCache's real ``lmcache_server``, and against fake servers that hang or die.

What is proven here: every operation of the remote-tier contract round-trips through the real
server; keys stay in LMCache's grammar and inside our namespace (value, block entry, rank and prefix
never collide); a restarted server is reconnected to without an error; a server that accepts and
never answers costs each call at most its timeout and the connection is dropped; a server that dies
mid-GET is a failed call and the next one works; a value under a valid key that is not the chunk is
a counted miss; concurrent threads never see each other's replies.
"""

from __future__ import annotations

import os
import threading
import time

import lm_servers as ls
import pytest
from remote_tier_support import BPC, ROW, fps, payload, planted_values, shape

from lmcache_connector.config import load_config
from lmcache_connector.tiers.base import PENDING, ChunkMiss
from lmcache_connector.tiers.remote.catalog import RemoteCatalog
from lmcache_connector.tiers.remote.client import connect_remote, served
from lmcache_connector.tiers.remote.lm_client import (
    KEY_BYTES,
    LMOptions,
    LMServerClient,
    RemoteUnavailableError,
    lm_key,
    side_key,
    value_key,
)
from lmcache_connector.tiers.remote.store import RemoteStore
from lmcache_connector.tiers.remote.value import ValueHeader, decode_value, encode_value_bytes
from lmcache_connector.urls import parse_remote_url

NS = "cd" * 16
TIMEOUT = 0.5  # the socket timeout of the clients facing fake servers
# Every start of the real server imports torch (seconds, more on a loaded machine): not the unit loop.
pytestmark = pytest.mark.slow


def connect(url: str, **options) -> LMServerClient:
    return LMServerClient(parse_remote_url(url), LMOptions(**options))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ls.lm_server(tmp_path_factory.mktemp("lm")) as srv:
        yield srv


@pytest.fixture
def client(server):
    c = connect(server.url)
    yield c
    c.close()


# ---------------------------------------------------------------- keys


def test_tier_keys_map_into_lmcache_grammar_inside_our_namespace():
    fp = "0f" * 16
    assert lm_key(value_key("lmc:", NS, "tp1pp0", fp)) == f"lmc:{NS[:16]}@0@1@{fp}@uint8"
    assert lm_key(side_key("lmc:", NS, "tp0pp0", fp)) == f"lmc:b:{NS[:16]}@0@0@{fp}@uint8"
    # Injective: values, block entries, ranks and prefixes (even with '@' and '%') stay apart.
    keys = [
        value_key(prefix, NS, rank, fp)
        for prefix in ("lmc:", "lmc:b:", "a@b:", "a%40b:", "team-a:lmc:")
        for rank in ("tp0pp0", "tp1pp0", "tp0pp1", "tp10pp1", "tp1pp10")
    ] + [side_key(prefix, NS, "tp0pp0", fp) for prefix in ("lmc:", "a@b:", "a%40b:")]
    mapped = [lm_key(key) for key in keys]
    assert len(set(mapped)) == len(set(keys))
    for key in mapped:
        model, world_size, worker_id, chunk_hash, dtype = key.split("@")  # exactly LMCache's five fields
        assert int(world_size) >= 0 and int(worker_id) >= 0 and len(chunk_hash) == 32 and dtype == "uint8"
        assert len(key.encode()) <= KEY_BYTES and key == key.strip()


@pytest.mark.parametrize("bad", ["lmc:" + NS[:16] + "-tp0pp0-" + "0f" * 15, "plain-key", "x-tp01pp0-" + "0f" * 16])
def test_a_key_that_is_not_a_tier_key_is_refused_before_sending(bad):
    with pytest.raises(ValueError):
        lm_key(bad)


def test_a_key_prefix_too_long_for_150_bytes_is_refused_at_start():
    with pytest.raises(ValueError, match="LMCACHE_REMOTE_KEY_PREFIX"):
        connect("lm://127.0.0.1:1", key_prefix="@" * 40)
    connect("lm://127.0.0.1:1", key_prefix="p" * 64).close()  # the longest plain prefix fits


def test_the_configuration_builds_an_lm_client_with_its_prefix_and_timeouts():
    config = load_config(
        env={
            "LMCACHE_REMOTE_URL": "lm://cache-server:65432",
            "LMCACHE_REMOTE_KEY_PREFIX": "team-a:",
            "LMCACHE_BLOCKING_TIMEOUT_SECS": "3",
        }
    )
    assert served(config.parsed_remote_url)
    client = connect_remote(config.parsed_remote_url, config)
    assert isinstance(client, LMServerClient) and client.key_prefix == "team-a:"
    assert client.options.socket_timeout_secs == 3 and not client.failures_are_partial
    lookup = connect_remote(config.parsed_remote_url, config, socket_timeout_secs=0.25)
    assert lookup.options.socket_timeout_secs == 0.25 and lookup.options.connect_timeout_secs == 0.25


# ---------------------------------------------------------------- the real server


def test_every_operation_round_trips_through_the_real_server(client, server):
    client.ping()
    block_fps = [os.urandom(16).hex() for _ in range(BPC)]
    header = ValueHeader(NS, "tp0pp0", block_fps[-1], tuple(block_fps), shape(BPC))
    data = os.urandom(header.nbytes)
    key = value_key("lmc:", NS, "tp0pp0", header.key)
    entries = [side_key("lmc:", NS, "tp0pp0", fp) for fp in block_fps]
    client.put(key, encode_value_bytes(header, [memoryview(data)]), entries, side_value="entry-text")
    absent = value_key("lmc:", NS, "tp1pp0", header.key)  # same chunk, another rank: not written
    assert client.exists_many([key, absent, *entries]) == [True, False, *[True] * len(entries)]
    assert client.exists_many([]) == []
    assert client.resolve_side_keys([*entries, side_key("lmc:", NS, "tp0pp0", "00" * 16)]) == [
        *["entry-text"] * len(entries),
        None,
    ]
    into = memoryview(bytearray(header.nbytes))
    decode_value(client.get(key), header, [into])
    assert bytes(into) == data
    assert client.get(absent) is None
    # The value's key was not overwritten by the block entry of its own last block (same fingerprint).
    assert client.get(side_key("lmc:", NS, "tp0pp0", block_fps[-1])) == b"entry-text"
    # What the server cannot do: documented no-ops.
    assert client.expire_many([key], 60) == [True]
    assert client.delete_many([key]) == 0 and client.delete_matching(f"lmc:{NS[:16]}-*") == 0
    assert client.exists_many([key]) == [True]
    assert client.memory() == (0, 0)


def test_values_of_many_mib_and_empty_values_round_trip(client):
    for size in (0, 1, 9 << 20):
        key = value_key("lmc:", NS, "tp0pp0", os.urandom(16).hex())
        data = os.urandom(size)
        client.put(key, memoryview(data))
        assert bytes(client.get(key)) == data


def test_threads_sharing_one_client_never_read_each_others_replies(client):
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(30):
                key = value_key("lmc:", NS, f"tp{seed}pp0", os.urandom(16).hex())
                data = os.urandom(1000 + 997 * ((seed * 31 + i) % 50))
                client.put(key, data, [side_key("lmc:", NS, "tp0pp0", os.urandom(16).hex())], side_value=key)
                assert client.exists_many([key]) == [True]
                assert client.get(key) == data
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_a_restarted_server_is_reconnected_to_and_serves_what_is_stored_after(tmp_path):
    srv = ls.LMServer(tmp_path / "lm").start()
    try:
        client = connect(srv.url)
        key = value_key("lmc:", NS, "tp0pp0", "01" * 16)
        client.put(key, b"before")
        assert client.get(key) == b"before"

        # Restarted between two requests: the pooled connection is found closed and replaced.
        srv.kill()
        srv.start()
        assert client.get(key) is None  # the server keeps nothing across a restart: a miss, no error
        client.put(key, b"after")
        assert client.get(key) == b"after"

        # Down for a while: calls fail fast (refused), and work again once it is back.
        srv.kill()
        started = time.monotonic()
        with pytest.raises(RemoteUnavailableError):
            client.get(key)
        with pytest.raises(RemoteUnavailableError):
            client.ping()
        assert time.monotonic() - started < 1.0
        srv.start()
        deadline = time.monotonic() + 5
        while True:  # at most one reconnect back-off (<= 1 s) after the failures above
            try:
                client.ping()
                break
            except RemoteUnavailableError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        client.put(key, b"again")
        assert client.exists_many([key]) == [True] and client.get(key) == b"again"
        client.close()
    finally:
        srv.kill()


# ---------------------------------------------------------------- servers that misbehave


def test_a_server_that_accepts_and_never_answers_fails_every_call_within_the_timeout():
    key = value_key("lmc:", NS, "tp0pp0", "02" * 16)
    calls = {
        "ping": lambda c: c.ping(),
        "exists_many": lambda c: c.exists_many([key]),
        "get": lambda c: c.get(key),
        "put": lambda c: c.put(key, os.urandom(4 << 20), [side_key("lmc:", NS, "tp0pp0", "02" * 16)]),
        "resolve_side_keys": lambda c: c.resolve_side_keys([key]),
    }
    with ls.silent_server() as silent:
        client = connect(silent.url, socket_timeout_secs=TIMEOUT)
        for n, (name, call) in enumerate(calls.items(), start=1):
            started = time.monotonic()
            with pytest.raises(RemoteUnavailableError, match="timed out"):
                call(client)
            elapsed = time.monotonic() - started
            assert elapsed < TIMEOUT + 0.3, f"{name} took {elapsed:.2f} s"
            # The connection was dropped, not pooled: every call opened a fresh one.
            assert client._idle == []
            deadline = time.monotonic() + 2
            while silent.connections < n:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert silent.connections == n
        client.close()


def test_a_small_write_to_a_hung_server_is_sent_and_the_next_call_fails_within_the_timeout():
    key = value_key("lmc:", NS, "tp0pp0", "05" * 16)
    with ls.silent_server() as silent:
        client = connect(silent.url, socket_timeout_secs=TIMEOUT)
        client.put(key, b"small")  # fits the socket buffers: sent, its confirmation owed
        started = time.monotonic()
        with pytest.raises(RemoteUnavailableError, match="timed out"):
            client.exists_many([key])  # waits for the owed answer first, within its own deadline
        assert time.monotonic() - started < TIMEOUT + 0.3
        assert client._idle == [] and client._owing == []
        client.close()


def test_a_write_the_server_never_confirmed_costs_that_connection_only():
    key = value_key("lmc:", NS, "tp0pp0", "06" * 16)
    with ls.unconfirming_server() as dying:
        client = connect(dying.url, socket_timeout_secs=TIMEOUT)
        client.put(key, b"lost")  # the server closes instead of confirming: a future miss
        assert client.get(key) is None  # the unconfirmed connection is dropped; a fresh one answers
        assert dying.connections == 2
        client.ping()
        client.close()


def test_a_client_reads_its_own_writes_from_any_thread_and_close_confirms_the_last(server):
    writer = connect(server.url)
    keys = [value_key("lmc:", NS, "tp0pp0", os.urandom(16).hex()) for _ in range(20)]
    for key in keys:
        writer.put(key, key.encode() * 1000)
    found: list[list[bool]] = []
    reader = threading.Thread(target=lambda: found.append(writer.exists_many(keys)))
    reader.start()
    reader.join()
    assert found == [[True] * len(keys)]
    last = value_key("lmc:", NS, "tp0pp0", os.urandom(16).hex())
    writer.put(last, os.urandom(1 << 20))
    writer.close()  # reads the owed confirmation before closing
    other = connect(server.url)
    assert other.exists_many([last]) == [True]
    other.close()


def test_a_server_killed_mid_get_is_a_failed_call_and_the_next_request_works():
    key = value_key("lmc:", NS, "tp0pp0", "03" * 16)
    with ls.half_body_server(b"x" * 5000) as dying:
        client = connect(dying.url, socket_timeout_secs=TIMEOUT)
        with pytest.raises(RemoteUnavailableError, match="closed the connection"):
            client.get(key)
        assert client._idle == []  # never reused: its stream is out of step
        assert client.get(key) is None  # a fresh connection, correctly framed
        assert client.exists_many([key, key]) == [False, False]
        client.ping()
        client.close()


def test_through_the_store_a_server_killed_mid_get_is_a_miss_and_reads_resume():
    prompt = fps("mid-get", BPC)
    header = ValueHeader(NS, "tp0pp0", prompt[-1].hex(), tuple(fp.hex() for fp in prompt), shape(BPC))
    with ls.half_body_server(encode_value_bytes(header, [memoryview(payload(BPC, 1))])) as dying:
        store = RemoteStore(connect(dying.url, socket_timeout_secs=TIMEOUT), NS, "tp0pp0", shape)
        into = [memoryview(bytearray(2 * BPC * ROW))]
        with pytest.raises(ChunkMiss) as miss:
            store.read_into(prompt[-1], prompt, into)
        assert not miss.value.gone  # a failed read, not a verdict on the chunk
        time.sleep(0.6)  # the store's own back-off after a failure (0.5 s)
        with pytest.raises(ChunkMiss, match="not in the remote store"):
            store.read_into(prompt[-1], prompt, into)  # the server answered: a plain miss
        store.close(1)


# ---------------------------------------------------------------- the remote tier on it


def test_the_tier_shares_chunks_block_granularly_through_the_real_server(server):
    prompt = fps("lm-doc", BPC)
    data = payload(BPC, 1)
    writer = RemoteStore(connect(server.url), NS, "tp0pp0", shape)
    writer.submit_write(1, prompt[-1], prompt, [memoryview(data)])
    assert writer.flush(5)
    assert [(r.job_id, r.ok) for r in writer.take_results()[0]] == [(1, True)]
    writer.close(1)

    catalog = RemoteCatalog(connect(server.url, socket_timeout_secs=2), NS, ["tp0pp0"], lookup_timeout_s=2)
    try:

        def answer(block_fps):
            catalog.prefetch(block_fps, BPC)
            deadline = time.monotonic() + 5
            while (found := catalog.best_piece(block_fps)) is PENDING:
                assert time.monotonic() < deadline
                time.sleep(0.005)
                catalog.poll()
            return found

        chunk, blocks = answer(prompt)
        assert (chunk.key, blocks) == (prompt[-1], BPC)
        chunk, blocks = answer(prompt[:2] + fps("other", 2))  # shares the first two blocks only
        assert (chunk.key, blocks) == (prompt[-1], 2)
        assert answer(fps("unrelated", BPC)) is None
    finally:
        catalog.close()

    reader = RemoteStore(connect(server.url), NS, "tp0pp0", shape)
    into = bytearray(len(data))
    reader.read_into(prompt[-1], prompt, [memoryview(into)])
    assert bytes(into) == data
    reader.close(1)


@pytest.mark.parametrize("planted", ["foreign", "truncated", "corrupt", "other-version", "garbage", "empty"])
def test_a_value_that_is_not_this_chunk_is_a_counted_miss(server, planted):
    prompt = fps(f"bad-{planted}", BPC)
    key = lm_key(value_key("lmc:", NS, "tp0pp0", prompt[-1].hex()))
    values = planted_values(NS, prompt)
    ls.raw_put(server.port, key, values[planted])
    store = RemoteStore(connect(server.url), NS, "tp0pp0", shape)
    into = bytearray(len(payload(BPC, 1)))
    with pytest.raises(ChunkMiss) as miss:
        store.read_into(prompt[-1], prompt, [memoryview(into)])
    assert miss.value.gone
    assert store.take_counts() == {"bad_values.remote": 1}
    # The bad value was abandoned mid-stream (its header said enough): the stream is not misframed.
    good = fps(f"good-after-{planted}", BPC)
    data = payload(BPC, 2)
    store.submit_write(1, good[-1], good, [memoryview(data)])
    assert store.flush(5)
    store.read_into(good[-1], good, [memoryview(into)])
    assert bytes(into) == data
    store.close(1)


def test_a_planted_block_entry_is_a_miss_not_an_error(server, client):
    entry = side_key("lmc:", NS, "tp0pp0", "04" * 16)
    ls.raw_put(server.port, lm_key(entry), b"\xff\xfe not text")
    assert client.resolve_side_keys([entry]) == [None]
