"""The remote tier's two halves against a real redis-server, without an engine: what one engine writes
another finds (block-granular, every rank), bad values are misses, and a store that dies or hangs
costs a bounded wait, never a stall, and comes back by itself."""

from __future__ import annotations

import time

import pytest
import redis_servers as rs
from remote_tier_support import BPC, ROW, answer, fps, payload, planted_values, shape, write

from lmcache_connector.keys import rank_tag
from lmcache_connector.tiers.base import ChunkMiss
from lmcache_connector.tiers.remote import catalog as remote_catalog
from lmcache_connector.tiers.remote import store as remote_store
from lmcache_connector.tiers.remote.catalog import RemoteCatalog
from lmcache_connector.tiers.remote.redis_client import RedisOptions, connect_redis, value_key
from lmcache_connector.tiers.remote.store import RemoteStore
from lmcache_connector.urls import parse_remote_url

NS = "ab" * 16


def client(server, **options):
    return connect_redis(parse_remote_url(f"redis://127.0.0.1:{server.port}"), RedisOptions(**options))


def make_store(server, rank: str = "tp0pp0", **options) -> RemoteStore:
    return RemoteStore(client(server, **options), NS, rank, shape)


def make_catalog(server, ranks=("tp0pp0",), timeout_s: float = 0.5, **options) -> RemoteCatalog:
    return RemoteCatalog(client(server, **options), NS, list(ranks), lookup_timeout_s=timeout_s)


@pytest.fixture
def server(tmp_path):
    with rs.redis_server(tmp_path / "redis") as server:
        yield server


def test_a_chunk_one_engine_wrote_is_found_and_read_by_another(server):
    prompt = fps("doc", BPC)
    data = payload(BPC, 1)
    write(make_store(server), prompt, data)

    catalog = make_catalog(server)  # another engine: it never saw the write
    try:
        chunk, blocks = answer(catalog, prompt)
        assert (chunk.key, chunk.block_fps, blocks) == (prompt[-1], tuple(prompt), BPC)
        # Block-granular: a prompt that shares only the first two blocks finds the same chunk.
        diverging = prompt[:2] + fps("other", 2)
        chunk, blocks = answer(catalog, diverging)
        assert (chunk.key, blocks) == (prompt[-1], 2)
        assert answer(catalog, fps("unrelated", BPC)) is None
    finally:
        catalog.close()

    reader = make_store(server)
    into = bytearray(len(data))
    reader.read_into(prompt[-1], prompt, [memoryview(into)])
    assert bytes(into) == data


def test_a_partial_last_chunk_is_found_by_a_longer_prompt(server):
    short = fps("doc", 2)  # the last, partial chunk of a short prompt
    write(make_store(server), short, payload(2, 3))
    catalog = make_catalog(server)
    try:
        chunk, blocks = answer(catalog, fps("doc", BPC))
        assert (chunk.key, blocks) == (short[-1], 2)
    finally:
        catalog.close()


def test_with_tensor_parallel_a_chunk_counts_only_when_every_rank_wrote_it(server):
    ranks = [rank_tag(0), rank_tag(1)]
    prompt = fps("tp", BPC)
    write(make_store(server, ranks[0]), prompt, payload(BPC, 1))
    first = make_catalog(server, ranks)
    try:
        assert answer(first, prompt) is None  # rank 1's shard is missing
    finally:
        first.close()
    write(make_store(server, ranks[1]), prompt, payload(BPC, 2))
    second = make_catalog(server, ranks)
    try:
        assert answer(second, prompt)[1] == BPC
    finally:
        second.close()


def test_a_chunk_already_in_the_store_is_not_sent_again(server):
    prompt = fps("dup", BPC)
    write(make_store(server), prompt, payload(BPC, 1))
    again = make_store(server)
    again.submit_write(7, prompt[-1], prompt, [memoryview(payload(BPC, 1))])
    assert again.flush(5)
    (result,), _ = again.take_results()
    assert result.ok and result.nbytes == 0  # acknowledged, nothing sent


@pytest.mark.parametrize(
    "planted",
    [
        "foreign",  # a valid value of another chunk under this chunk's key
        "truncated",
        "corrupt",
        "other-version",
        "garbage",
    ],
)
def test_a_value_that_is_not_this_chunk_is_a_counted_miss(server, planted):
    prompt = fps("bad", BPC)
    key = value_key("lmc:", NS, "tp0pp0", prompt[-1].hex())
    values = planted_values(NS, prompt)
    with server.admin() as admin:
        admin.set(key, values[planted])
    store = make_store(server)
    into = bytearray(len(payload(BPC, 1)))
    with pytest.raises(ChunkMiss) as miss:
        store.read_into(prompt[-1], prompt, [memoryview(into)])
    assert miss.value.gone
    assert store.take_counts() == {"bad_values.remote": 1}


def test_an_evicted_value_is_a_miss_that_the_planner_can_forget(server):
    prompt = fps("gone", BPC)
    write(make_store(server), prompt, payload(BPC, 1))
    with server.admin() as admin:
        admin.delete(value_key("lmc:", NS, "tp0pp0", prompt[-1].hex()))
    with pytest.raises(ChunkMiss, match="evicted or expired") as miss:
        make_store(server).read_into(prompt[-1], prompt, [memoryview(bytearray(len(payload(BPC, 1))))])
    assert miss.value.gone


def test_maxmemory_smaller_than_the_working_set_evicts_without_errors(tmp_path):
    with rs.redis_server(tmp_path / "small", maxmemory="2mb") as small:
        prompts = [fps(f"p{i}", BPC) for i in range(40)]
        big = payload(BPC, 0) * 32  # 128 KiB a chunk: 40 of them are 5 MiB

        def wide(blocks: int) -> tuple[int, int, int]:
            return (2, blocks, ROW * 32)

        store = RemoteStore(client(small), NS, "tp0pp0", wide)
        for i, prompt in enumerate(prompts):
            store.submit_write(i, prompt[-1], prompt, [memoryview(big)])
            store.flush(5)
        results, _ = store.take_results()
        assert all(r.ok for r in results)  # evictions are Redis's business, not errors
        catalog = make_catalog(small)
        try:
            found = [answer(catalog, prompt) is not None for prompt in prompts]
        finally:
            catalog.close()
        assert 0 < sum(found) < len(prompts)  # the oldest went, the newest stayed
        reader = RemoteStore(client(small), NS, "tp0pp0", wide)
        for prompt, there in zip(prompts, found, strict=True):
            if there:
                into = bytearray(len(big))
                try:
                    reader.read_into(prompt[-1], prompt, [memoryview(into)])
                except ChunkMiss:
                    continue  # evicted between the lookup and the read: a miss, as promised
                assert bytes(into) == big


def test_clear_removes_this_namespace_and_nothing_else(server):
    prompt = fps("mine", BPC)
    write(make_store(server), prompt, payload(BPC, 1))
    with server.admin() as admin:
        admin.set("lmc:ffffffffffffffff-tp0pp0-" + "00" * 16, b"another model's")
        admin.set("unrelated", b"x")
    catalog = make_catalog(server)
    try:
        assert answer(catalog, prompt) is not None
        catalog.clear()
        deadline = time.monotonic() + 5
        with server.admin() as admin:
            while admin.dbsize() > 2:
                assert time.monotonic() < deadline, "the namespace's keys were not removed"
                time.sleep(0.05)
            assert sorted(admin.keys()) == [b"lmc:ffffffffffffffff-tp0pp0-" + b"00" * 16, b"unrelated"]
        assert answer(catalog, prompt) is None
    finally:
        catalog.close()


def test_a_hung_store_is_a_bounded_miss_then_down_and_it_comes_back(server, monkeypatch, caplog):
    monkeypatch.setattr(remote_catalog.RemoteCatalog, "probe_first_s", 0.1)
    monkeypatch.setattr(remote_store, "BACKOFF_FIRST_S", 0.2)
    prompt = fps("hang", BPC)
    write(make_store(server), prompt, payload(BPC, 1))
    catalog = make_catalog(server, timeout_s=0.1, socket_timeout_secs=0.5)
    store = make_store(server, socket_timeout_secs=0.5, connect_timeout_secs=0.5)
    try:
        server.pause()
        started = time.monotonic()
        found = answer(catalog, fps("new", BPC), timeout=2.0)  # asked while the store hangs
        assert found is None and time.monotonic() - started < 0.4  # the deadline, not the socket timeout
        assert catalog.take_counts() == {"remote_failures": 1}  # a late answer: counted, not an outage yet
        # The catalog's call fails at its socket timeout (0.5 s): that marks the tier down.
        deadline = time.monotonic() + 3
        while catalog.up():
            catalog.poll()
            assert time.monotonic() < deadline, "a hung store was never marked down"
            time.sleep(0.02)
        assert not catalog.accepts_writes()
        assert catalog.best_piece(prompt) is None  # down: no lookup waits at all
        assert any("is down" in r.getMessage() for r in caplog.records)

        with pytest.raises(ChunkMiss):
            store.read_into(prompt[-1], prompt, [memoryview(bytearray(len(payload(BPC, 1))))])
        started = time.monotonic()
        store.submit_write(9, prompt[-1], prompt, [memoryview(payload(BPC, 1))])
        assert time.monotonic() - started < 0.05  # never blocks the forward pass
        assert store.flush(2)
        assert [r.ok for r in store.take_results()[0]] == [False]

        server.resume()
        deadline = time.monotonic() + 5
        while not catalog.up():
            catalog.poll()
            assert time.monotonic() < deadline, "the catalog never came back"
            time.sleep(0.02)
        assert answer(catalog, prompt)[1] == BPC
        time.sleep(0.3)  # past the store's back-off: the next call is the probe
        into = bytearray(len(payload(BPC, 1)))
        store.read_into(prompt[-1], prompt, [memoryview(into)])
        assert bytes(into) == payload(BPC, 1)
        assert any("is back" in r.getMessage() for r in caplog.records)
        warnings = [r.getMessage() for r in caplog.records if "remote tier" in r.getMessage()]
        assert len(warnings) <= 5  # one late lookup, one down and one back per half: not one per request
    finally:
        server.resume()
        catalog.close()
        store.close(1)


def test_a_full_write_queue_drops_writes_instead_of_waiting(server):
    server.pause()
    try:
        store = RemoteStore(
            client(server, socket_timeout_secs=1.0, connect_timeout_secs=1.0), NS, "tp0pp0", shape, queue_chunks=2
        )
        started = time.monotonic()
        for i in range(6):
            prompt = fps(f"q{i}", BPC)
            store.submit_write(i, prompt[-1], prompt, [memoryview(payload(BPC, i))])
        assert time.monotonic() - started < 0.1
        assert store.take_counts().get("dropped_writes.remote", 0) >= 3
    finally:
        server.resume()
    store.flush(5)
    store.close(1)
