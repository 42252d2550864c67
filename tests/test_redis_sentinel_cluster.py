"""The Redis client behind Sentinels and on a Cluster, against real ones on loopback: a failover is
followed, a cluster's keys spread over every node and are batched per node.

Slow by design (``tests/conftest.py``): Sentinels need seconds to find each other and to fail over,
and a cluster seconds to form."""

from __future__ import annotations

import time

import pytest
import redis
import redis_servers as rs
from test_redis_client import PASSWORD, assert_round_trip, connect, stored_chunk

from lmcache_connector.config import load_config
from lmcache_connector.tiers.remote.redis_client import RedisOptions, RemoteAuthError, connect_redis
from lmcache_connector.tiers.remote.value import decode_value

SENTINEL_PASSWORD = "pw-of-the-sentinels"
SERVICE = "kvcache"


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory) -> rs.SentinelSet:
    folder = tmp_path_factory.mktemp("sentinel")
    with rs.sentinel_set(folder, password=PASSWORD, sentinel_password=SENTINEL_PASSWORD, service_name=SERVICE) as s:
        yield s


@pytest.fixture(scope="module")
def sentinel_password_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("secret") / "sentinel-password"
    path.write_text(SENTINEL_PASSWORD + "\n")
    return str(path)


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory) -> rs.Cluster:
    with rs.cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


# ---------------------------------------------------------------- Sentinel


def test_sentinel_round_trip_writes_and_reads_on_the_master(sentinels, sentinel_password_file):
    client = connect(
        f"redis-sentinel://:{PASSWORD}@{sentinels.sentinel_hosts}/{SERVICE}",
        sentinel_password_file=sentinel_password_file,
    )
    assert_round_trip(client)
    key, *_ = stored_chunk(client)
    with sentinels.master.admin() as master:
        assert master.exists(key)  # written to the master, so a read right after never misses on a lagging replica


def test_the_service_name_and_passwords_come_from_the_settings(sentinels, sentinel_password_file, tmp_path):
    password_file = tmp_path / "master-password"
    password_file.write_text(PASSWORD)
    config = load_config(
        env={
            "LMCACHE_REMOTE_URL": f"redis-sentinel://{sentinels.sentinel_hosts}",
            "LMCACHE_REMOTE_SERVICE_NAME": SERVICE,
            "LMCACHE_REMOTE_PASSWORD_FILE": str(password_file),
            "LMCACHE_REMOTE_SENTINEL_PASSWORD_FILE": sentinel_password_file,
        }
    )
    assert_round_trip(connect_redis(config.parsed_remote_url, RedisOptions.from_config(config)))


def test_a_wrong_sentinel_password_names_its_setting(sentinels, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password")
    client = connect(
        f"redis-sentinel://:{PASSWORD}@{sentinels.sentinel_hosts}/{SERVICE}", sentinel_password_file=str(wrong)
    )
    with pytest.raises(RemoteAuthError, match="refused the password: check LMCACHE_REMOTE_SENTINEL_PASSWORD_FILE="):
        client.ping()

    without = connect(f"redis-sentinel://:{PASSWORD}@{sentinels.sentinel_hosts}/{SERVICE}")
    with pytest.raises(
        RemoteAuthError, match="need a password of their own: set LMCACHE_REMOTE_SENTINEL_PASSWORD_FILE"
    ):
        without.ping()


def test_a_wrong_master_password_names_its_setting(sentinels, sentinel_password_file):
    client = connect(
        f"redis-sentinel://:wrong@{sentinels.sentinel_hosts}/{SERVICE}", sentinel_password_file=sentinel_password_file
    )
    with pytest.raises(RemoteAuthError, match="check the password in LMCACHE_REMOTE_URL"):
        client.ping()


def test_a_failover_is_followed_and_replicated_chunks_survive_it(sentinels, sentinel_password_file):
    """Last in the module for Sentinel: it kills the master."""
    client = connect(
        f"redis-sentinel://:{PASSWORD}@{sentinels.sentinel_hosts}/{SERVICE}",
        sentinel_password_file=sentinel_password_file,
        socket_timeout_secs=1.0,
        connect_timeout_secs=0.5,
    )
    key, entries, header, payload = stored_chunk(client)
    sentinels.wait_replicated()
    sentinels.fail_over()

    into = memoryview(bytearray(header.nbytes))
    decode_value(_eventually(lambda: client.get(key)), header, [into])  # the same client, now on the new master
    assert bytes(into) == payload
    assert client.resolve_side_keys(entries) == [key] * len(entries)
    assert_round_trip(client)  # and it takes writes there
    with sentinels.replica.admin() as promoted:
        assert promoted.info("replication")["role"] == "master"


def _eventually(operation, timeout: float = 10.0):
    """The operation's result once it stops failing: connections to the old master fail until replaced."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return operation()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# ---------------------------------------------------------------- Cluster


def test_cluster_round_trip(redis_cluster):
    assert_round_trip(connect(f"redis-cluster://{redis_cluster.hosts}"))


def test_cluster_chunks_spread_over_every_node_and_batches_cross_slots(redis_cluster):
    client = connect(f"redis-cluster://{redis_cluster.hosts}")
    chunks = [stored_chunk(client) for _ in range(30)]
    keys = [key for key, *_ in chunks]
    for node in redis_cluster.nodes:
        with node.admin() as admin:
            assert admin.dbsize() > 0, f"no chunk on {node.name}"
    absent = [key[:-2] + "zz" for key in keys[:5]]
    assert client.exists_many([*keys, *absent]) == [True] * len(keys) + [False] * len(absent)
    entries = [entry for _, chunk_entries, *_ in chunks for entry in chunk_entries]
    owners = [key for key, chunk_entries, *_ in chunks for _ in chunk_entries]
    assert client.resolve_side_keys(entries) == owners


def test_cluster_keeps_serving_the_keys_of_the_nodes_that_remain(redis_cluster):
    """Last in the module for the cluster: it kills a node."""
    client = connect(f"redis-cluster://{redis_cluster.hosts}", socket_timeout_secs=1.0, connect_timeout_secs=0.5)
    chunks = [stored_chunk(client) for _ in range(12)]
    dead = redis_cluster.nodes[-1]
    with dead.admin() as admin:
        on_dead = {key for key, *_ in chunks if _owns(admin, key)}
    dead.kill()
    survivors = [chunk for chunk in chunks if chunk[0] not in on_dead]
    assert survivors and len(survivors) < len(chunks)
    for key, _, header, payload in survivors:
        into = memoryview(bytearray(header.nbytes))
        decode_value(_eventually(lambda key=key: client.get(key)), header, [into])
        assert bytes(into) == payload
    # A batch spanning every node answers for the live ones; the dead node's keys count as absent.
    keys = [key for key, *_ in chunks]
    assert client.exists_many(keys) == [key not in on_dead for key in keys]


def _owns(admin, key: str) -> bool:
    """Whether the node behind ``admin`` holds ``key``: any other node's key is a MOVED reply."""
    try:
        return bool(admin.exists(key))
    except redis.ResponseError:
        return False
