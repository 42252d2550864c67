"""The Redis client of the remote tier against real servers: every single-server form, credentials,
TLS, eviction, and a server that hangs or dies (Sentinel and Cluster: ``test_redis_sentinel_cluster.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis_servers as rs

from lmcache_connector.config import load_config
from lmcache_connector.tiers.remote.redis_client import (
    RedisClient,
    RedisOptions,
    RemoteAuthError,
    RemoteUnavailableError,
    connect_redis,
    side_key,
    value_key,
)
from lmcache_connector.tiers.remote.value import ValueHeader, decode_value, encode_value_bytes
from lmcache_connector.urls import parse_remote_url

PASSWORD = "pw-for-the-test-server"
SHAPE = (2, 4, 256)  # regions, blocks, row bytes: 2 KiB per value


def connect(url: str, **options) -> RedisClient:
    return connect_redis(parse_remote_url(url), RedisOptions(**options))


def stored_chunk(client: RedisClient, nbytes_per_block: int = SHAPE[2]) -> tuple[str, list[str], ValueHeader, bytes]:
    """Write one chunk of random bytes with its block entries; ``(value key, block entry keys, header, bytes)``."""
    namespace, block_fps = os.urandom(16).hex(), [os.urandom(16).hex() for _ in range(SHAPE[1])]
    shape = (SHAPE[0], SHAPE[1], nbytes_per_block)
    header = ValueHeader(namespace, "tp0pp0", block_fps[-1], tuple(block_fps), shape)
    payload = os.urandom(header.nbytes)
    prefix = client.options.key_prefix
    key = value_key(prefix, namespace, "tp0pp0", header.key)
    entries = [side_key(prefix, namespace, "tp0pp0", fp) for fp in block_fps[:-1]]
    client.put(key, encode_value_bytes(header, [memoryview(payload)]), entries)
    return key, entries, header, payload


def assert_round_trip(client: RedisClient) -> None:
    """Everything the tier will ask of a client, on whatever server it talks to."""
    client.ping()
    key, entries, header, payload = stored_chunk(client)
    absent = client.options.key_prefix + "0000000000000000-tp0pp0-" + "00" * 16
    assert client.exists_many([key, absent, *entries]) == [True, False, *[True] * len(entries)]
    assert client.resolve_side_keys([*entries, absent]) == [*[key] * len(entries), None]
    into = memoryview(bytearray(header.nbytes))
    decode_value(client.get(key), header, [into])
    assert bytes(into) == payload
    assert client.get(absent) is None
    assert client.delete_many([key, *entries, absent]) == 1 + len(entries)
    assert client.exists_many([key]) == [False]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> rs.RedisServer:
    with rs.redis_server(tmp_path_factory.mktemp("plain"), unix_socket=True) as srv:
        yield srv


@pytest.fixture(scope="module")
def secured(tmp_path_factory) -> rs.RedisServer:
    with rs.redis_server(tmp_path_factory.mktemp("auth"), unix_socket=True, password=PASSWORD) as srv:
        yield srv


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> rs.TlsFiles:
    return rs.tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, tls) -> rs.RedisServer:
    with rs.redis_server(tmp_path_factory.mktemp("tls-server"), tls=tls) as srv:
        yield srv


def _file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "secret"
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------- forms


def test_a_chunk_round_trips_over_tcp(server):
    assert_round_trip(connect(f"redis://127.0.0.1:{server.port}"))


def test_a_chunk_round_trips_over_a_unix_socket(server):
    assert_round_trip(connect(f"unix://{server.unix_socket}"))


def test_the_database_in_the_url_is_used(server):
    client = connect(f"redis://127.0.0.1:{server.port}/3")
    key, *_ = stored_chunk(client)
    with server.admin(db=3) as db3, server.admin() as db0:
        assert db3.exists(key) and not db0.exists(key)


def test_keys_follow_the_storage_name_rule_behind_the_prefix(server):
    client = connect(f"redis://127.0.0.1:{server.port}", key_prefix="team-a:lmc:")
    key, entries, header, _ = stored_chunk(client)
    assert key == f"team-a:lmc:{header.namespace[:16]}-tp0pp0-{header.key}"
    assert all(entry.startswith(f"team-a:lmc:b:{header.namespace[:16]}-tp0pp0-") for entry in entries)
    with server.admin() as admin:
        assert sorted(k.decode() for k in admin.scan_iter(match="team-a:lmc:*")) == sorted([key, *entries])


# ---------------------------------------------------------------- TTL


def test_a_ttl_covers_the_value_and_its_block_entries_and_a_hit_refreshes_it(server):
    client = connect(f"redis://127.0.0.1:{server.port}", ttl_secs=300)
    key, entries, *_ = stored_chunk(client)
    with server.admin() as admin:
        assert all(0 < admin.ttl(k) <= 300 for k in [key, *entries])
        admin.expire(key, 5)
        assert client.get(key) is not None
        assert admin.ttl(key) > 5  # GETEX put it back
        assert client.expire_many(entries, 600) == [True] * len(entries)
        assert all(admin.ttl(k) > 300 for k in entries)


def test_without_a_ttl_values_never_expire(server):
    client = connect(f"redis://127.0.0.1:{server.port}")
    key, *_ = stored_chunk(client)
    client.get(key)
    with server.admin() as admin:
        assert admin.ttl(key) == -1


# ---------------------------------------------------------------- credentials


def test_a_password_in_the_url_is_used(secured):
    assert_round_trip(connect(f"redis://:{PASSWORD}@127.0.0.1:{secured.port}"))
    assert_round_trip(connect(f"unix://:{PASSWORD}@{secured.unix_socket}"))


def test_a_password_file_is_used_through_the_settings(secured, tmp_path):
    config = load_config(
        env={
            "LMCACHE_REMOTE_URL": f"redis://127.0.0.1:{secured.port}",
            "LMCACHE_REMOTE_PASSWORD_FILE": _file(tmp_path, PASSWORD + "\n"),  # as a mounted Secret may end
        }
    )
    assert_round_trip(connect_redis(config.parsed_remote_url, RedisOptions.from_config(config)))


def test_a_wrong_password_is_a_clear_error_naming_the_setting(secured, tmp_path):
    with pytest.raises(RemoteAuthError) as err:
        connect(f"redis://:wrong-password@127.0.0.1:{secured.port}").ping()
    assert "LMCACHE_REMOTE_URL" in str(err.value) and "wrong-password" not in str(err.value)

    password_file = _file(tmp_path, "wrong-password")
    with pytest.raises(RemoteAuthError) as err:
        connect(f"redis://127.0.0.1:{secured.port}", password_file=password_file).ping()
    assert f"LMCACHE_REMOTE_PASSWORD_FILE={password_file!r}" in str(err.value)
    assert "wrong-password" not in str(err.value)


def test_a_missing_password_says_the_server_needs_one(secured):
    with pytest.raises(RemoteAuthError, match="the server needs a password: set LMCACHE_REMOTE_PASSWORD_FILE"):
        connect(f"redis://127.0.0.1:{secured.port}").exists_many(["k"])


def test_an_empty_or_unreadable_password_file_is_an_error_naming_it(secured, tmp_path):
    with pytest.raises(RemoteAuthError, match="LMCACHE_REMOTE_PASSWORD_FILE=.*the file is empty"):
        connect(f"redis://127.0.0.1:{secured.port}", password_file=_file(tmp_path, "\n"))
    with pytest.raises(RemoteAuthError, match="LMCACHE_REMOTE_PASSWORD_FILE=.*cannot read"):
        connect(f"redis://127.0.0.1:{secured.port}", password_file=str(tmp_path / "absent"))


# ---------------------------------------------------------------- TLS


def _tls_options(tls: rs.TlsFiles, **changes) -> dict:
    options = {
        "tls_ca_file": str(tls.ca),
        "tls_cert_file": str(tls.client_cert),
        "tls_key_file": str(tls.client_key),
    }
    return {**options, **changes}


def test_rediss_with_the_test_ca_and_a_client_certificate(tls_server, tls):
    assert_round_trip(connect(f"rediss://localhost:{tls_server.tls_port}", **_tls_options(tls)))


def test_tls_through_the_settings_on_a_redis_url(tls_server, tls):
    config = load_config(
        env={
            "LMCACHE_REMOTE_URL": f"redis://localhost:{tls_server.tls_port}",
            "LMCACHE_REMOTE_TLS": "True",
            "LMCACHE_REMOTE_TLS_CA_FILE": str(tls.ca),
            "LMCACHE_REMOTE_TLS_CERT_FILE": str(tls.client_cert),
            "LMCACHE_REMOTE_TLS_KEY_FILE": str(tls.client_key),
        }
    )
    assert_round_trip(connect_redis(config.parsed_remote_url, RedisOptions.from_config(config)))


def test_tls_without_the_ca_fails_verification(tls_server, tls):
    client = connect(f"rediss://localhost:{tls_server.tls_port}", **_tls_options(tls, tls_ca_file=None))
    with pytest.raises(RemoteUnavailableError, match="certificate verify failed"):
        client.ping()


def test_the_hostname_check_refuses_a_certificate_for_another_name(tls_server, tls):
    url = f"rediss://127.0.0.1:{tls_server.tls_port}"  # the certificate names localhost only
    with pytest.raises(RemoteUnavailableError, match="(?i)match|mismatch"):
        connect(url, **_tls_options(tls)).ping()
    connect(url, **_tls_options(tls, tls_check_hostname=False)).ping()  # still verified against the CA


def test_a_server_that_checks_clients_refuses_one_without_a_certificate(tls_server, tls):
    client = connect(f"rediss://localhost:{tls_server.tls_port}", tls_ca_file=str(tls.ca))
    with pytest.raises(RemoteUnavailableError):
        client.ping()


# ---------------------------------------------------------------- eviction and outages


def test_a_value_redis_evicted_is_simply_absent(tmp_path):
    with rs.redis_server(tmp_path, maxmemory="2mb", policy="allkeys-lru") as small:
        client = connect(f"redis://127.0.0.1:{small.port}")
        chunks = [stored_chunk(client, nbytes_per_block=16 * 1024) for _ in range(40)]  # 5 MiB in all, no error
        present = client.exists_many([key for key, *_ in chunks])
        assert not all(present) and present[-1]
        for (key, _, header, payload), there in zip(chunks, present, strict=True):
            data = client.get(key)
            assert (data is not None) == there
            if data is not None:
                into = memoryview(bytearray(header.nbytes))
                decode_value(data, header, [into])
                assert bytes(into) == payload
        gone = [entries for (_, entries, *_), there in zip(chunks, present, strict=True) if not there]
        resolved = client.resolve_side_keys(gone[0])  # an entry may outlive its value: then it is a miss
        assert all(value is None or not client.exists_many([value])[0] for value in resolved)


def test_a_hung_server_fails_every_operation_within_the_timeout_then_recovers(tmp_path):
    with rs.redis_server(tmp_path) as hung:
        client = connect(f"redis://127.0.0.1:{hung.port}", socket_timeout_secs=0.3, connect_timeout_secs=0.3)
        key, entries, *_ = stored_chunk(client)
        hung.pause()
        try:
            for operation in (
                lambda: client.exists_many([key]),
                lambda: client.get(key),
                lambda: client.put(key + "-2", b"v", entries),
                lambda: client.resolve_side_keys(entries),
                client.ping,
            ):
                started = time.monotonic()
                with pytest.raises(RemoteUnavailableError, match="(?i)timeout|timed out"):
                    operation()
                assert time.monotonic() - started < 1.0
        finally:
            hung.resume()
        assert client.exists_many([key]) == [True]  # the timed-out connections were replaced


def test_a_server_that_died_is_unavailable_at_once_and_used_again_after_its_restart(tmp_path):
    with rs.redis_server(tmp_path / "first") as first:
        port = first.port
        client = connect(f"redis://127.0.0.1:{port}")
        client.ping()
        first.kill()
        started = time.monotonic()
        with pytest.raises(RemoteUnavailableError):
            client.exists_many(["k"])
        assert time.monotonic() - started < 1.0
    with rs.redis_server(tmp_path / "second", port=port):
        assert_round_trip(client)  # the same client, its dead connection replaced


# ---------------------------------------------------------------- packaging


def test_without_redis_py_a_redis_url_says_which_extra_to_install():
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "from lmcache_connector.tiers.remote.redis_client import RedisOptions, connect_redis\n"
        "from lmcache_connector.urls import parse_remote_url\n"
        "try:\n"
        "    connect_redis(parse_remote_url('redis://h'), RedisOptions())\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'lmcache-connector[redis]'" in out
