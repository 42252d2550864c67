"""One vLLM engine run per Redis variant: TLS, unix socket with a password, a wrong password,
Sentinel (through a failover) and Cluster (through a dead node).

The client-level proofs are ``test_redis_client.py`` and ``test_redis_sentinel_cluster.py``; here a
real engine runs on each variant. Each engine has a memory tier of four chunk slots, so a document
it stored is pushed out of memory by a few other prompts and must come back from Redis: the
document's whole blocks are cached again, every one of them counted as a remote hit, and the greedy
output equals the first (cold) serving. One engine per variant, one at a time.
"""

from __future__ import annotations

import time

import pytest
import redis_servers as rs
from redis.crc import key_slot
from vllm_support import assert_same_greedy, start_engine

from lmcache_connector.testing.tiny_model import TINY, random_prompt
from lmcache_connector.testing.vllm_process import EngineError
from lmcache_connector.tiers.remote.redis_client import side_key, value_key

CHUNK = {"chunk_size": 128}  # 4 blocks of 32 tokens: 64 KiB a chunk for TINY in bf16 (512 bytes a token)
BLOCK = 32
BLOCKS_PER_CHUNK = 4
SLOTS = 4
MEMORY_GB = "0.000262144"  # 262,144 bytes: room for four 64 KiB chunk slots, no more
DOCUMENT = 400  # 12 whole blocks (3 chunks) and 16 tokens more
FILLER = 512  # 4 chunks: one filler alone fills the memory tier
PASSWORD = "pw-for-the-variant-server"
SERVICE = "kvcache"
PREFIX = "lmc:"
RANK = "tp0pp0"


def remote_env(url: str, **extra: str) -> dict[str, str]:
    return {
        "LMCACHE_REMOTE_URL": url,
        "LMCACHE_MAX_LOCAL_CPU_SIZE": MEMORY_GB,
        "LMCACHE_REMOTE_LOOKUP_TIMEOUT_MS": "300",
        "LMCACHE_BLOCKING_TIMEOUT_SECS": "2",
        **extra,
    }


def engine_on(engine_tmp, url: str, **extra: str):
    engine = start_engine(TINY, engine_tmp, env=remote_env(url, **extra), extra_config=CHUNK, cpus={0})
    try:
        assert engine.call("connector_state", settle=False)["num_slots"] == SLOTS
    except BaseException:
        engine.close()
        raise
    return engine


def one(engine, prompt, max_tokens: int = 8) -> dict:
    return engine.generate([prompt], max_tokens=max_tokens, logprobs=5)[0]


def stored(engine, prompt) -> dict:
    """Serve ``prompt`` and wait until its chunks are written to Redis."""
    out = one(engine, prompt)
    engine.call("connector_state")  # flushes the remote writes and lets the engine hear of them
    return out


def hits(engine) -> dict[str, int]:
    state = engine.call("connector_state", settle=False)
    return {"evictions": state["evictions"], **state["totals"]["hit_tokens_by_tier"]}


def push_out_of_memory(engine, seed: int, count: int = 2) -> None:
    """Serve ``count`` fillers of four chunks each: the memory tier (four slots) keeps none of what came before."""
    before = engine.call("connector_state", settle=False)["evictions"]
    for i in range(count):
        stored(engine, random_prompt(FILLER, seed=seed + i))
    assert engine.call("connector_state", settle=False)["evictions"] >= before + count * SLOTS - SLOTS


def assert_from_remote(engine, prompt, cold: dict, whole: int | None = None) -> dict:
    """``prompt`` is served with ``whole`` (default: all its whole blocks) cached tokens, every one from
    Redis (none from memory), and the same greedy output as ``cold``."""
    whole = len(prompt) // BLOCK * BLOCK if whole is None else whole
    before = hits(engine)
    warm = one(engine, prompt)
    after = hits(engine)
    assert warm["num_cached_tokens"] == whole
    assert after.get("remote", 0) - before.get("remote", 0) == whole
    assert after.get("memory", 0) == before.get("memory", 0)  # the memory tier had evicted it
    assert_same_greedy(cold, warm)
    return warm


def served_from_remote_after_eviction(engine, seed: int) -> None:
    """The one engine run of a variant: store a document, push it out of memory, get it back from Redis."""
    document = random_prompt(DOCUMENT, seed=seed)
    cold = stored(engine, document)
    push_out_of_memory(engine, seed=seed + 1)
    assert_from_remote(engine, document, cold)


def chunk_keys(engine, prompt, chunk: int) -> list[str]:
    """The Redis keys a lookup and a load of ``prompt``'s chunk ``chunk`` need: the chunk's value (its
    key is its last block's fingerprint) and its block entries (one per block)."""
    ids = engine.call("fingerprints", prompt=prompt)
    ns, fps = ids["namespace"], ids["fingerprints"]
    blocks = fps[chunk * BLOCKS_PER_CHUNK : (chunk + 1) * BLOCKS_PER_CHUNK]
    assert len(blocks) == BLOCKS_PER_CHUNK
    return [value_key(PREFIX, ns, RANK, blocks[-1]), *(side_key(PREFIX, ns, RANK, fp) for fp in blocks)]


# ---------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> rs.TlsFiles:
    return rs.tls_files(tmp_path_factory.mktemp("tls"))


def test_rediss_with_the_test_ca_and_a_client_certificate(engine_tmp, tmp_path, tls):
    # The server demands a client certificate (tls-auth-clients yes) and its own names only localhost.
    with rs.redis_server(tmp_path / "tls", tls=tls, tls_auth_clients=True) as server:
        engine = engine_on(
            engine_tmp,
            f"rediss://localhost:{server.tls_port}",
            LMCACHE_REMOTE_TLS_CA_FILE=str(tls.ca),
            LMCACHE_REMOTE_TLS_CERT_FILE=str(tls.client_cert),
            LMCACHE_REMOTE_TLS_KEY_FILE=str(tls.client_key),
        )
        with engine:
            served_from_remote_after_eviction(engine, seed=1000)
        with server.admin() as admin:  # the plain port: the values did go through the TLS one
            assert admin.dbsize() > 0


# ---------------------------------------------------------------- unix socket and password


@pytest.fixture(scope="module")
def secured(tmp_path_factory) -> rs.RedisServer:
    with rs.redis_server(tmp_path_factory.mktemp("secured"), unix_socket=True, password=PASSWORD) as server:
        yield server


def password_file(folder, password: str) -> str:
    path = folder / "redis-password"
    path.write_text(password + "\n")  # as a mounted Secret or ``echo`` leaves it
    return str(path)


def test_unix_socket_with_the_password_from_a_file(engine_tmp, tmp_path, secured):
    engine = engine_on(
        engine_tmp,
        f"unix://{secured.unix_socket}",
        LMCACHE_REMOTE_PASSWORD_FILE=password_file(tmp_path, PASSWORD),
    )
    with engine:
        served_from_remote_after_eviction(engine, seed=2000)
    with secured.admin() as admin:
        assert admin.dbsize() > 0


@pytest.mark.parametrize("where", ["url", "file"])
def test_a_wrong_password_stops_the_engine_naming_the_setting(engine_tmp, tmp_path, secured, where):
    wrong = "not-the-right-pw"
    if where == "url":
        url, extra = f"unix://:{wrong}@{secured.unix_socket}", {}
        names = "check the password in LMCACHE_REMOTE_URL"
    else:
        path = password_file(tmp_path, wrong)
        url, extra = f"unix://{secured.unix_socket}", {"LMCACHE_REMOTE_PASSWORD_FILE": path}
        names = f"check LMCACHE_REMOTE_PASSWORD_FILE={path!r}"
    with pytest.raises(EngineError) as err:
        start_engine(TINY, engine_tmp, env=remote_env(url, **extra), extra_config=CHUNK, cpus={0}).close()
    message = str(err.value)
    assert "the remote tier cannot start" in message
    assert "refused the credentials" in message
    assert names in message
    assert wrong not in message and PASSWORD not in message


# ---------------------------------------------------------------- Sentinel


@pytest.fixture
def sentinels(tmp_path) -> rs.SentinelSet:
    with rs.sentinel_set(tmp_path / "sentinel", service_name=SERVICE) as s:
        yield s


def test_sentinel_failover_is_followed_by_the_same_engine(engine_tmp, sentinels):
    engine = engine_on(
        engine_tmp,
        f"redis-sentinel://{sentinels.sentinel_hosts}",
        LMCACHE_REMOTE_SERVICE_NAME=SERVICE,
    )
    with engine:
        document = random_prompt(DOCUMENT, seed=3000)
        cold = stored(engine, document)
        # Probes: prompts of two whole chunks stored now, each served once after the failover until
        # one hits (a probe that misses is recomputed and kept in memory, so none is asked twice).
        probes = [random_prompt(2 * 128 + 16, seed=3100 + i) for i in range(8)]
        probe_cold = [stored(engine, probe) for probe in probes]
        push_out_of_memory(engine, seed=3001)
        with sentinels.master.admin() as master:
            assert master.exists(*chunk_keys(engine, document, 0)) == 1 + BLOCKS_PER_CHUNK
        sentinels.wait_replicated()
        sentinels.fail_over()

        # The connector's clients reconnect through the Sentinels to the promoted replica. A lookup that
        # timed out meanwhile marks the tier down until a background probe (backing off from 0.5 s) gets
        # through: wait as it does, about 20 s in all.
        pause = 0.5
        for probe, expected in zip(probes, probe_cold, strict=True):
            out = one(engine, probe)
            assert_same_greedy(expected, out)  # hit or miss, the output is right
            if out["num_cached_tokens"] > 0:
                assert out["num_cached_tokens"] == 256
                break
            time.sleep(pause)
            pause = min(pause * 2, 4.0)
        else:
            pytest.fail("no probe hit the promoted master within about 20 s of the failover")

        assert_from_remote(engine, document, cold)  # replicated before the failover, read from the new master
        with sentinels.replica.admin() as promoted:
            assert promoted.info("replication")["role"] == "master"
            fresh = random_prompt(300, seed=3200)
            stored(engine, fresh)  # and the engine writes to the new master
            assert promoted.exists(*chunk_keys(engine, fresh, 0)) == 1 + BLOCKS_PER_CHUNK


# ---------------------------------------------------------------- Cluster


@pytest.fixture
def redis_cluster(tmp_path) -> rs.Cluster:
    with rs.cluster(tmp_path / "cluster") as c:
        yield c


def slot_owners(node: rs.RedisServer) -> dict[int, int]:
    """Slot -> port of the master serving it, as ``node`` sees the cluster."""
    owners = {}
    with node.admin() as admin:
        for start, end, master, *_ in admin.execute_command("CLUSTER SLOTS"):
            for slot in range(start, end + 1):
                owners[slot] = int(master[1])
    return owners


def test_cluster_keeps_serving_and_hits_survivors_when_a_node_dies(engine_tmp, redis_cluster):
    nodes = redis_cluster.nodes
    engine = engine_on(engine_tmp, f"redis-cluster://{redis_cluster.hosts}")
    with engine:
        documents = [random_prompt(DOCUMENT, seed=4000 + i) for i in range(12)]
        cold = [stored(engine, document) for document in documents]
        push_out_of_memory(engine, seed=4100)

        # Chunks spread over every node.
        for node in nodes:
            with node.admin() as admin:
                assert admin.dbsize() > 0, f"{node.name} holds no keys"

        # Kill a node that holds none of one document's first-chunk keys (its value and block entries):
        # that document must still hit, from the survivors.
        owners = slot_owners(nodes[0])
        ports_of = [{owners[key_slot(key.encode())] for key in chunk_keys(engine, doc, 0)} for doc in documents]
        choice = next(((i, node) for i, ports in enumerate(ports_of) for node in nodes if node.port not in ports), None)
        assert choice is not None, "no document has all its first-chunk keys off some node"
        chosen, victim = choice
        by_port = {node.port: node for node in nodes}
        for key in chunk_keys(engine, documents[chosen], 0):  # where the slot map says, on a survivor
            with by_port[owners[key_slot(key.encode())]].admin() as admin:
                assert admin.exists(key)
        victim.kill()

        # Every request completes with the right output; the chosen document's first chunk at least is a hit.
        before = hits(engine)
        out = one(engine, documents[chosen])
        assert out["num_cached_tokens"] >= 128
        assert hits(engine).get("remote", 0) - before.get("remote", 0) == out["num_cached_tokens"]
        assert_same_greedy(cold[chosen], out)
        others = [i for i in range(len(documents)) if i != chosen]
        served = engine.generate([documents[i] for i in others], max_tokens=8, logprobs=5)
        for i, out in zip(others, served, strict=True):
            assert_same_greedy(cold[i], out)
