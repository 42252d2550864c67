"""The S3 client of the remote tier against a real S3 endpoint (moto_server on loopback): every
operation, the URL's prefix, the tier's two halves on S3 (block-granular finds, an object a
lifecycle rule deleted is a miss, bad values are counted misses), and the failures an operator
meets at start: refused credentials, a missing bucket, an endpoint that is down or hangs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import s3_servers as ss
from remote_tier_support import BPC, answer, fps, payload, planted_values, shape, write

from lmcache_connector.config import LMCacheConfig
from lmcache_connector.geometry import Geometry
from lmcache_connector.keys import Namespace
from lmcache_connector.tiers.base import ChunkMiss
from lmcache_connector.tiers.remote import catalog as remote_catalog
from lmcache_connector.tiers.remote import s3_client
from lmcache_connector.tiers.remote.catalog import RemoteCatalog
from lmcache_connector.tiers.remote.client import RemoteAuthError, RemoteUnavailableError, side_key, value_key
from lmcache_connector.tiers.remote.medium import RemoteMedium
from lmcache_connector.tiers.remote.s3_client import BucketNotFoundError, S3Client, S3Options, connect_s3_with
from lmcache_connector.tiers.remote.store import RemoteStore
from lmcache_connector.tiers.remote.value import ValueHeader, decode_block_entry, encode_value_bytes
from lmcache_connector.urls import parse_remote_url

NS = "ab" * 16
BUCKET = "lmc-tests"


@pytest.fixture(scope="module")
def moto(tmp_path_factory) -> Iterator[ss.MotoServer]:
    with ss.moto_server(tmp_path_factory.mktemp("moto")) as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture
def s3(moto, monkeypatch) -> Iterator[ss.MotoServer]:
    """The module's server, with this process's AWS environment pointing at it."""
    with ss.aws_env(monkeypatch, moto.env()):
        yield moto


def client(url: str = f"s3://{BUCKET}/tests", **options) -> S3Client:
    return connect_s3_with(parse_remote_url(url), S3Options(**{"timeout_secs": 5.0, **options}))


def geometry() -> Geometry:
    namespace = Namespace("tiny", "bfloat16", "NHD", 4096, 2, 16, 64)
    return Geometry(16, BPC, 4096, 8, namespace, 1)


# ---------------------------------------------------------------- the client's operations


def test_every_operation_round_trips_under_the_urls_prefix(s3):
    c = client(f"s3://{BUCKET}/round/trip")
    c.ping()
    block_fps = [os.urandom(16).hex() for _ in range(BPC)]
    header = ValueHeader(NS, "tp0pp0", block_fps[-1], tuple(block_fps), shape(BPC))
    data = os.urandom(header.nbytes)
    key = value_key("lmc:", NS, "tp0pp0", header.key)
    entries = [side_key("lmc:", NS, "tp0pp0", fp) for fp in block_fps]
    absent = value_key("lmc:", NS, "tp0pp0", "00" * 16)
    c.put(key, memoryview(encode_value_bytes(header, [memoryview(data)])), entries, side_value="the-entry")

    assert s3.objects(BUCKET, "round/") == sorted(f"round/trip/{name}" for name in [key, *entries])
    assert c.exists_many([key, absent, *entries]) == [True, False, *[True] * BPC]
    assert c.resolve_side_keys([*entries, absent]) == [*["the-entry"] * BPC, None]
    assert c.get(absent) is None
    value = c.get(key)
    assert value is not None and value.endswith(data)
    assert c.expire_many([key], 60) == [True]  # S3 has no TTL: nothing to refresh
    assert c.memory() == (0, 0)
    assert c.exists_many([]) == [] and c.resolve_side_keys([]) == []

    assert client(f"s3://{BUCKET}/elsewhere").get(key) is None  # another prefix, another store
    assert c.delete_matching(f"lmc:b:{NS[:16]}-*") == BPC  # the entries only
    assert s3.objects(BUCKET, "round/") == [f"round/trip/{key}"]
    assert c.delete_many([key]) == 1
    assert s3.objects(BUCKET, "round/") == []
    c.close()


def test_deletes_go_in_batches_and_a_namespace_clear_leaves_other_keys(s3, monkeypatch):
    monkeypatch.setattr(s3_client, "DELETE_BATCH", 3)  # as S3's 1,000, at a test's size
    c = client(f"s3://{BUCKET}/batches")
    mine = [value_key("lmc:", NS, "tp0pp0", f"{i:032x}") for i in range(7)]
    other = value_key("lmc:", "cd" * 16, "tp0pp0", "00" * 16)
    for key in [*mine, other]:
        c.put(key, b"v")
    assert c.delete_matching(f"lmc:{NS[:16]}-*") == 7
    assert s3.objects(BUCKET, "batches/") == [f"batches/{other}"]
    assert c.delete_many([other, *mine]) == 8  # S3 does not say which existed
    assert s3.objects(BUCKET, "batches/") == []


def test_addressing_is_path_style_on_a_custom_endpoint_and_virtual_hosted_on_aws(monkeypatch):
    def object_url(c: S3Client) -> str:  # signed locally: nothing is sent
        return c._s3.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "k"})

    env = {**ss.isolated_aws_env(), "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    with ss.aws_env(monkeypatch, {**env, "AWS_ENDPOINT_URL": "http://minio.internal:9000"}):
        custom = client()
        assert custom.addressing == "path"  # a MinIO without wildcard DNS for bucket host names
        assert object_url(custom).startswith(f"http://minio.internal:9000/{BUCKET}/k?")
        assert object_url(client(addressing_style="virtual")).startswith(f"http://{BUCKET}.minio.internal:9000/k?")
    with ss.aws_env(monkeypatch, env):  # AWS itself
        on_aws = client()
        assert on_aws.addressing == "auto"  # botocore's own choice there: virtual-hosted for such a name
        assert object_url(on_aws).startswith(f"https://{BUCKET}.s3.amazonaws.com/k?")
        assert object_url(client(addressing_style="path")).startswith(f"https://s3.amazonaws.com/{BUCKET}/k?")


def test_planted_block_entries_are_misses_and_a_large_one_is_read_only_in_part(s3):
    c = client(f"s3://{BUCKET}/planted")
    names = [side_key("lmc:", NS, "tp0pp0", f"{i:032x}") for i in range(3)]
    admin = s3.admin()
    admin.put_object(Bucket=BUCKET, Key=f"planted/{names[0]}", Body=b"\xff\xfe not ascii")
    admin.put_object(Bucket=BUCKET, Key=f"planted/{names[1]}", Body=b"")
    admin.put_object(Bucket=BUCKET, Key=f"planted/{names[2]}", Body=b"a" * (s3_client.ENTRY_READ_BYTES + 5000))
    found = c.resolve_side_keys(names)
    assert [decode_block_entry(raw) for raw in found] == [None, None, None]
    assert len(found[2]) == s3_client.ENTRY_READ_BYTES


def test_without_boto3_an_s3_url_says_which_extra_to_install():
    code = (
        "import sys; sys.modules['boto3'] = None\n"
        "from lmcache_connector.tiers.remote.s3_client import S3Options, connect_s3_with\n"
        "from lmcache_connector.urls import parse_remote_url\n"
        "try:\n"
        "    connect_s3_with(parse_remote_url('s3://bucket'), S3Options())\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'lmcache-connector[s3]'" in out


# ---------------------------------------------------------------- the tier's halves on S3


def test_a_chunk_one_engine_wrote_is_found_block_granular_and_read_by_another(s3):
    url = f"s3://{BUCKET}/tier"
    prompt = fps("doc", BPC)
    data = payload(BPC, 1)
    write(RemoteStore(client(url), NS, "tp0pp0", shape), prompt, data)
    short = fps("tail", 2)  # the last, partial chunk of another prompt
    write(RemoteStore(client(url), NS, "tp0pp0", shape), short, payload(2, 3), job_id=2)

    catalog = RemoteCatalog(client(url), NS, ["tp0pp0"], lookup_timeout_s=2.0)
    try:
        chunk, blocks = answer(catalog, prompt)
        assert (chunk.key, chunk.block_fps, blocks) == (prompt[-1], tuple(prompt), BPC)
        chunk, blocks = answer(catalog, prompt[:2] + fps("other", 2))  # shares two blocks of the chunk
        assert (chunk.key, blocks) == (prompt[-1], 2)
        chunk, blocks = answer(catalog, fps("tail", BPC))
        assert (chunk.key, blocks) == (short[-1], 2)
        assert answer(catalog, fps("unrelated", BPC)) is None
    finally:
        catalog.close()

    into = bytearray(len(data))
    RemoteStore(client(url), NS, "tp0pp0", shape).read_into(prompt[-1], prompt, [memoryview(into)])
    assert bytes(into) == data


def test_a_chunk_costs_two_objects_and_exact_repeats_survive_an_overwritten_entry(s3):
    """One value and one block entry (under the chunk's first block) a chunk, not one a block. Two
    continuations of the same first block share that entry (the last writer's): each is still found
    whole by its own prompt, and a prompt sharing part of them finds what it shares with the last."""
    url = f"s3://{BUCKET}/two-objects"
    first = fps("shared", 3) + fps("first", BPC - 3)
    second = first[:2] + fps("second", BPC - 2)
    write(RemoteStore(client(url), NS, "tp0pp0", shape), first, payload(BPC, 1))
    assert len(s3.objects(BUCKET, "two-objects/")) == 2
    write(RemoteStore(client(url), NS, "tp0pp0", shape), second, payload(BPC, 2))
    assert len(s3.objects(BUCKET, "two-objects/")) == 3  # the second chunk's entry replaced the first's

    catalog = RemoteCatalog(client(url), NS, ["tp0pp0"], lookup_timeout_s=2.0)
    try:
        assert answer(catalog, first)[0].key == first[-1] and answer(catalog, first)[1] == BPC
        assert answer(catalog, second)[0].key == second[-1] and answer(catalog, second)[1] == BPC
        chunk, blocks = answer(catalog, first[:3] + fps("third", BPC - 3))
        assert (chunk.key, blocks) == (second[-1], 2)  # the entry names the second: two shared blocks
    finally:
        catalog.close()


class CountingClient:
    """The real client, counting the questions the catalog asks it (HEADs and entry GETs)."""

    def __init__(self, real: S3Client):
        self.real = real
        self.questions = 0

    def __getattr__(self, name: str):
        return getattr(self.real, name)

    def exists_many(self, keys):
        self.questions += 1
        return self.real.exists_many(keys)

    def resolve_side_keys(self, keys):
        self.questions += 1
        return self.real.resolve_side_keys(keys)


def test_a_periodic_listing_finds_chunks_without_asking_and_forgets_deleted_ones(s3):
    url = f"s3://{BUCKET}/listing"
    ranks = ["tp0pp0", "tp1pp0"]
    both, one = fps("both-ranks", BPC), fps("one-rank", BPC)
    for rank in ranks:
        write(RemoteStore(client(url), NS, rank, shape), both, payload(BPC, 1))
    write(RemoteStore(client(url), NS, ranks[0], shape), one, payload(BPC, 2))
    counting = CountingClient(client(url))
    catalog = RemoteCatalog(counting, NS, ranks, lookup_timeout_s=2.0, list_interval_s=0.3)
    try:
        deadline = time.monotonic() + 5
        while both[-1] not in catalog.listed:  # the first listing landed
            assert time.monotonic() < deadline, "the listing never arrived"
            catalog.poll()
            time.sleep(0.02)
        catalog.prefetch(both, BPC)
        chunk, blocks = catalog.best_piece(both)
        assert (chunk.key, blocks) == (both[-1], BPC)
        assert counting.questions == 0  # answered from the listing: nothing asked
        assert answer(catalog, one) is None  # one rank's value only: not listed, asked, not held

        # A lifecycle rule deletes the value: the next listing no longer holds it.
        for rank in ranks:
            s3.admin().delete_object(Bucket=BUCKET, Key=f"listing/{value_key('lmc:', NS, rank, both[-1].hex())}")
        deadline = time.monotonic() + 5
        while both[-1] in catalog.listed:
            assert time.monotonic() < deadline, "the deleted chunk stayed listed"
            catalog.poll()
            time.sleep(0.02)
    finally:
        catalog.close()


def test_an_object_deleted_behind_the_tiers_back_is_a_miss(s3, monkeypatch):
    monkeypatch.setattr(remote_catalog.RemoteCatalog, "answer_ttl_s", 0.2)  # a used answer is asked again after this
    url = f"s3://{BUCKET}/lifecycle"
    prompt = fps("expiring", BPC)
    write(RemoteStore(client(url), NS, "tp0pp0", shape), prompt, payload(BPC, 1))
    catalog = RemoteCatalog(client(url), NS, ["tp0pp0"], lookup_timeout_s=2.0)
    try:
        assert answer(catalog, prompt)[1] == BPC
        # What a bucket lifecycle rule does: the value goes, its block entries may stay a while.
        s3.admin().delete_object(Bucket=BUCKET, Key=f"lifecycle/{value_key('lmc:', NS, 'tp0pp0', prompt[-1].hex())}")
        with pytest.raises(ChunkMiss, match="evicted or expired") as miss:
            RemoteStore(client(url), NS, "tp0pp0", shape).read_into(
                prompt[-1], prompt, [memoryview(bytearray(len(payload(BPC, 1))))]
            )
        assert miss.value.gone
        time.sleep(1.3)  # the answer was used: it expires (the catalog sweeps once a second)
        assert answer(catalog, prompt) is None  # asked again: the entries name a chunk that is gone
    finally:
        catalog.close()


@pytest.mark.parametrize("planted", ["foreign", "truncated", "corrupt", "garbage"])
def test_a_value_that_is_not_this_chunk_is_a_counted_miss(s3, planted):
    prompt = fps(f"bad-{planted}", BPC)
    values = planted_values(NS, prompt)
    name = f"bad/{value_key('lmc:', NS, 'tp0pp0', prompt[-1].hex())}"
    s3.admin().put_object(Bucket=BUCKET, Key=name, Body=values[planted])
    store = RemoteStore(client(f"s3://{BUCKET}/bad"), NS, "tp0pp0", shape)
    with pytest.raises(ChunkMiss) as miss:
        store.read_into(prompt[-1], prompt, [memoryview(bytearray(len(payload(BPC, 1))))])
    assert miss.value.gone
    assert store.take_counts() == {"bad_values.remote": 1}


# ---------------------------------------------------------------- what an operator meets at start


def test_credentials_the_store_refuses_stop_the_tier_at_start(tmp_path, monkeypatch):
    config = LMCacheConfig(remote_url=f"s3://{BUCKET}/auth", blocking_timeout_secs=3.0)
    with ss.moto_server(tmp_path / "auth") as strict:  # a server of its own: it checks every signature
        strict.create_bucket(BUCKET)
        key_id, secret = strict.require_credentials()
        with ss.aws_env(monkeypatch, strict.env()):
            catalog = RemoteMedium().catalog(config, geometry())
            assert catalog is not None and catalog.up()
            catalog.close()
        for wrong in (strict.env(key_id="AKIAUNKNOWNKEY000000"), strict.env(secret="not-" + secret)):
            with ss.aws_env(monkeypatch, wrong):
                with pytest.raises(ValueError, match="refused the credentials .*check AWS_ACCESS_KEY_ID"):
                    RemoteMedium().catalog(config, geometry())
                with pytest.raises(RemoteAuthError):  # every operation says the same, not just a ping
                    client(f"s3://{BUCKET}/auth").get("lmc:k")


def test_no_credentials_at_all_is_a_clear_error_at_start(s3, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    config = LMCacheConfig(remote_url=f"s3://{BUCKET}")
    with pytest.raises(ValueError, match="no AWS credentials found: set AWS_ACCESS_KEY_ID"):
        RemoteMedium().catalog(config, geometry())


def test_a_missing_bucket_is_a_clear_error_at_start(s3):
    with pytest.raises(ValueError, match="bucket 'no-such-bucket' does not exist"):
        RemoteMedium().catalog(LMCacheConfig(remote_url="s3://no-such-bucket/x"), geometry())
    with pytest.raises(BucketNotFoundError):
        client("s3://no-such-bucket").put("lmc:k", b"v")


def test_a_dead_or_hung_endpoint_fails_within_the_timeout(monkeypatch, caplog):
    refused = ss.free_port()
    hung = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)

    def fails_within(timeout: float, operation) -> None:
        started = time.monotonic()
        with pytest.raises(RemoteUnavailableError):
            operation()
        assert time.monotonic() - started < timeout + 0.25

    def endpoint(port: int) -> dict[str, str]:
        env = {**ss.isolated_aws_env(), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        return {**env, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}

    try:
        with ss.aws_env(monkeypatch, endpoint(hung.getsockname()[1])):
            short = client(f"s3://{BUCKET}", timeout_secs=1.0)  # one attempt
            fails_within(1.0, short.ping)
            fails_within(1.0, lambda: short.get("lmc:k"))
            retried = client(f"s3://{BUCKET}", timeout_secs=3.0)  # two attempts and a back-off
            fails_within(3.0, lambda: retried.exists_many(["lmc:a", "lmc:b"]))
        with ss.aws_env(monkeypatch, endpoint(refused)):
            dead = client(f"s3://{BUCKET}", timeout_secs=3.0)
            fails_within(3.0, dead.ping)
            fails_within(3.0, lambda: dead.put("lmc:k", b"v", ["lmc:b:k"]))
            # At start this is a warning, not an error: the tier starts down and is probed.
            catalog = RemoteMedium().catalog(LMCacheConfig(remote_url=f"s3://{BUCKET}"), geometry())
            assert catalog is not None and not catalog.up()
            catalog.close()
    finally:
        hung.close()
    assert any("does not answer" in r.getMessage() for r in caplog.records)
