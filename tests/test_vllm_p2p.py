"""Two vLLM engine processes share chunks peer to peer, found through a real redis-server registry.

Engine A computes, engine B (no tier but its own memory) fetches A's chunks from A's memory and
from A's disk, block-granular, with the same greedy output; both hold the same
``LMCACHE_P2P_AUTH_TOKEN``. A third engine with a wrong token gets nothing from A and serves
correctly; an engine of another model in the same registry neither fetches A's chunks nor serves
A any. Holders planted in the registry that answer garbage or never answer cost B a recompute and
one warning each, and are skipped for a while. With the registry hung (SIGSTOP), both engines serve
from their own tiers, and sharing resumes once it answers again. Last, A is killed mid-run: B
recomputes what only A held, its next request is served from its own memory, and A stops being a
holder once its liveness key expires. The engines run side by side, one core each (the extra
engines take B's core while B is idle).

Tensor parallelism on real engines (TP = 2, two worker processes per engine) is
``test_vllm_p2p_tp.py``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import pytest
from peer_support import FakePeer, free_ports, hold_until_closed, recv_exactly
from remote_engines import BLOCK, CHUNK, engine_pair, one
from vllm_support import assert_same_greedy, start_engine

from lmcache_connector.testing.tiny_model import SMALL_MHA, TINY, random_prompt
from lmcache_connector.tiers.base import StoredChunk
from lmcache_connector.tiers.peer import auth
from lmcache_connector.tiers.peer.addresses import InstanceId
from lmcache_connector.tiers.peer.client import BAD_FIRST_S
from lmcache_connector.tiers.peer.protocol import (
    FRAME_BYTES,
    hello_frame,
    parse_auth,
    parse_frame_header,
    welcome_frame,
)
from lmcache_connector.tiers.peer.registry import LIVE_TTL_S, PeerRegistry, connect_registry, holders_key, live_key
from lmcache_connector.tiers.remote.redis_client import RedisOptions
from lmcache_connector.urls import parse_redis_url

TOKEN = "a-token-the-deployment-shares-0123456789"
BLOCKS_PER_CHUNK = CHUNK["chunk_size"] // BLOCK


def p2p_env(redis, **extra: str) -> dict[str, str]:
    return {
        "LMCACHE_ENABLE_P2P": "True",
        "LMCACHE_LOOKUP_URL": f"redis://127.0.0.1:{redis.port}",
        "LMCACHE_DISTRIBUTED_URL": f"127.0.0.1:{free_ports(1)}",
        "LMCACHE_P2P_AUTH_TOKEN": TOKEN,
        "LMCACHE_REMOTE_LOOKUP_TIMEOUT_MS": "300",
        "LMCACHE_BLOCKING_TIMEOUT_SECS": "2",
        **extra,
    }


@pytest.fixture(scope="module")
def pair(engine_tmp, redis):
    """A: a memory tier of 8 chunks and a disk tier; B: memory only."""
    env_a = p2p_env(
        redis,
        LMCACHE_MAX_LOCAL_CPU_SIZE="0.0005",
        LMCACHE_LOCAL_DISK=str(engine_tmp / "disk-a"),
        LMCACHE_MAX_LOCAL_DISK_SIZE="0.1",
    )
    env_b = p2p_env(redis)
    with engine_pair(engine_tmp, env_a, env_b) as (first, second):
        for engine, env in ((first, env_a), (second, env_b)):
            engine.peer_port = int(env["LMCACHE_DISTRIBUTED_URL"].rsplit(":", 1)[1])
        yield first, second


def chunks_of(engine, prompt) -> tuple[str, list[StoredChunk]]:
    """The engine's namespace (hex) and the chunks ``prompt`` is stored as."""
    ids = engine.call("fingerprints", prompt=prompt)
    fps = [bytes.fromhex(fp) for fp in ids["fingerprints"]]
    chunks = [fps[i : i + BLOCKS_PER_CHUNK] for i in range(0, len(fps), BLOCKS_PER_CHUNK)]
    return ids["namespace"], [StoredChunk(c[-1], tuple(c)) for c in chunks]


def computed_and_published(engine, redis, prompt) -> dict:
    """Serve ``prompt`` on ``engine`` and wait until the registry names a holder of each of its chunks."""
    out = one(engine, prompt)
    engine.call("connector_state")  # the workers report the chunks stored: held, so published
    namespace, chunks = chunks_of(engine, prompt)
    names = [holders_key("lmc:", namespace, chunk.key.hex()) for chunk in chunks]
    deadline = time.monotonic() + 10
    with redis.admin() as admin:
        while not all(admin.scard(name) for name in names):
            assert time.monotonic() < deadline, "the chunks were never published"
            time.sleep(0.05)
    return out


def peer_hits(engine) -> int:
    return engine.call("connector_state", settle=False)["totals"]["hit_tokens_by_tier"].get("peer", 0)


def worker_total(engine, key: str) -> float:
    return engine.call("connector_state")["worker_totals"].get(key, 0)


def registry_of(redis, namespace: str) -> PeerRegistry:
    """The registry as an instance of ``namespace`` sees it (to plant holders, or ask who holds what)."""
    options = RedisOptions(socket_timeout_secs=1.0, connect_timeout_secs=1.0)
    return PeerRegistry(connect_registry(parse_redis_url(f"127.0.0.1:{redis.port}"), options), namespace)


def instance_of(engine, redis) -> InstanceId:
    """The id under which ``engine`` (the one serving on ``engine.peer_port``) is live in the registry."""
    with redis.admin() as admin:
        for name in admin.scan_iter(match="lmc:p2p:live:*"):
            name = name.decode() if isinstance(name, bytes) else name
            instance = InstanceId.parse(name.removeprefix("lmc:p2p:live:")[17:])  # after "<ns16>-"
            if instance is not None and instance.address.port == engine.peer_port:
                return instance
    raise AssertionError(f"no live instance serves on port {engine.peer_port}")


def proving_the_token(then: Callable[[socket.socket], None]) -> Callable:
    """A :class:`FakePeer` behaviour: the handshake of an honest peer that knows the engines' token,
    then it reads the request and does ``then`` instead of answering."""

    def behave(sock: socket.socket, chunks) -> None:
        server_nonce = auth.new_nonce()
        sock.sendall(hello_frame(server_nonce, auth_required=True))
        head = parse_frame_header(recv_exactly(sock, FRAME_BYTES))
        client_nonce, _ = parse_auth(recv_exactly(sock, head.length))
        sock.sendall(welcome_frame(auth.server_proof(TOKEN.encode(), server_nonce, client_nonce), 64))
        head = parse_frame_header(recv_exactly(sock, FRAME_BYTES))
        recv_exactly(sock, head.length)  # the request
        then(sock)

    return behave


# Each broken peer, and what B's warning says of it (not a refused handshake: the peer knows the token).
BROKEN_PEERS = {
    "answers garbage": (
        proving_the_token(lambda sock: (sock.sendall(os.urandom(4096)), hold_until_closed(sock))),
        "no magic",
    ),
    "never answers": (proving_the_token(hold_until_closed), "sent nothing in time"),
}


def test_a_second_engine_fetches_what_the_first_holds_in_memory(pair, redis):
    first, second = pair
    prompt = random_prompt(600, seed=1)
    cold = computed_and_published(first, redis, prompt)
    served = worker_total(first, "served_chunks.peer")
    warm = one(second, prompt)
    assert warm["num_cached_tokens"] == 600 // BLOCK * BLOCK  # every whole block, the partial chunk too
    assert peer_hits(second) == warm["num_cached_tokens"]  # vLLM counts them under source="p2p"
    assert_same_greedy(cold, warm)
    assert worker_total(first, "served_chunks.peer") - served == 5


def test_a_prompt_sharing_part_of_a_chunk_reuses_every_shared_block(pair, redis):
    first, second = pair
    document = random_prompt(500, seed=2)
    computed_and_published(first, redis, document)
    question = document[:300] + random_prompt(100, seed=3)  # diverges inside the third chunk
    warm = one(second, question)
    assert warm["num_cached_tokens"] == 300 // BLOCK * BLOCK
    assert_same_greedy(one(first, question), warm)


def test_a_chunk_the_first_engine_holds_only_on_disk_is_fetched_from_its_disk(pair, redis):
    first, second = pair
    prompt = random_prompt(600, seed=4)
    cold = computed_and_published(first, redis, prompt)
    for seed in (5, 6):  # ten more chunks through A's 8 memory slots: the prompt's are evicted
        computed_and_published(first, redis, random_prompt(600, seed=seed))
    warm = one(second, prompt)
    assert warm["num_cached_tokens"] == 600 // BLOCK * BLOCK
    assert_same_greedy(cold, warm)


def test_an_engine_with_a_wrong_token_gets_no_chunk_and_serves_correctly(pair, redis, engine_tmp):
    first, _ = pair
    prompt = random_prompt(400, seed=7)
    cold = computed_and_published(first, redis, prompt)
    served = worker_total(first, "served_chunks.peer")
    env = p2p_env(redis, LMCACHE_P2P_AUTH_TOKEN="not-the-token-of-the-deployment")
    with start_engine(TINY, engine_tmp, env=env, extra_config=CHUNK, cpus={1}) as intruder:
        out = one(intruder, prompt)
        assert worker_total(intruder, "failed_loads") > 0  # it tried A, which refused it
    assert_same_greedy(cold, out)
    assert worker_total(first, "served_chunks.peer") == served


def test_an_engine_of_another_model_in_the_registry_never_fetches_nor_serves_a_chunk(pair, redis, engine_tmp):
    """Same registry, same token, another model (another namespace): A's prompt is recomputed there,
    the other engine's prompt is recomputed on A, and neither engine serves the other a byte."""
    first, _ = pair
    prompt = random_prompt(400, seed=9)
    computed_and_published(first, redis, prompt)
    served = worker_total(first, "served_chunks.peer")
    theirs = random_prompt(400, seed=10)
    with start_engine(SMALL_MHA, engine_tmp, env=p2p_env(redis), extra_config=CHUNK, cpus={1}) as other:
        out = one(other, prompt)
        assert out["num_cached_tokens"] == 0  # computed there in full: correct by construction
        assert peer_hits(other) == 0 and worker_total(other, "failed_loads") == 0  # A was never even asked
        computed_and_published(other, redis, theirs)  # its chunks, under its own namespace
        mine = one(first, theirs)
        assert mine["num_cached_tokens"] == 0
        assert worker_total(other, "served_chunks.peer") == 0
    assert worker_total(first, "served_chunks.peer") == served


def test_holders_that_answer_garbage_or_never_answer_cost_a_recompute_one_warning_and_are_skipped(pair, redis):
    """Holders planted in the registry (live, naming a chunk of the prompt) that pass the handshake
    and then answer garbage, or nothing: B recomputes with the right output, stays up, names each
    bad peer in one warning, and does not dial it again within the skip window (1 s, doubling), nor
    plan a load from it meanwhile (a load fails only where the peer was dialled); a request after
    the window tries it again, without a second warning. The other ways a peer breaks
    (a corrupt chunk or a wrong checksum, an oversized or truncated frame, another chunk than the
    one asked, another protocol version, answers out of order) are the same miss in the client and
    are proved with each broken peer of ``peer_support`` in ``test_peer_transfer.py``."""
    first, second = pair
    prompts = {kind: [random_prompt(200, seed=30 + 3 * i + j) for j in range(3)] for i, kind in enumerate(BROKEN_PEERS)}
    every = [p for trio in prompts.values() for p in trio]
    expected = dict(zip(map(tuple, every), first.generate(every, max_tokens=8, logprobs=5), strict=True))
    first.call("connector_state")
    namespace, _ = chunks_of(first, every[0])
    first.call("reset_prefix_cache", reset_connector=True)  # A withdraws them: the planted peer is their only holder
    names = [holders_key("lmc:", namespace, chunks_of(first, p)[1][0].key.hex()) for p in every]
    deadline = time.monotonic() + 10
    with redis.admin() as admin:
        while any(admin.scard(name) for name in names):
            assert time.monotonic() < deadline, "A never withdrew the chunks"
            time.sleep(0.05)
    second.call("keep_warnings")
    one(second, random_prompt(200, seed=29))  # warm: the request after a failure must come within 1 s
    registry = registry_of(redis, namespace)
    try:
        for kind, (behave, why) in BROKEN_PEERS.items():
            peer = FakePeer(behave, handshake=False)
            try:
                instance = InstanceId.new(peer.address)
                registry.heartbeat(instance)
                registry.publish(instance, [chunks_of(first, p)[1][0] for p in prompts[kind]])
                failed = worker_total(second, "failed_loads")
                first_try = one(second, prompts[kind][0])
                assert peer.connections == 1, kind
                registry.heartbeat(instance)  # still live (its TTL is 10 s; a slow machine spends much of it)
                within = one(second, prompts[kind][1])  # right after: the peer is skipped while its window lasts
                peer.wait_all_ended()
                # B may dial it again, but never sooner than the window after the connection that failed
                # (how soon ``within`` reaches its load depends on the machine: the window is timed
                # from the failure, inside the first request).
                for dialled, failed_end in zip(peer.dialled_at[1:], peer.ended_at, strict=False):
                    assert dialled - failed_end >= BAD_FIRST_S * 0.8, f"{kind}: dialled again too soon"
                # The window doubles with each failure: wait until the present one surely ended.
                window = BAD_FIRST_S * 2 ** (peer.connections - 1)
                # (B's scheduler hears of each window in the step that failed, a moment after its worker.)
                time.sleep(max(0.0, peer.ended_at[-1] + window + 0.5 - time.monotonic()))
                registry.heartbeat(instance)
                dials = peer.connections
                after = one(second, prompts[kind][2])  # the window ended: the peer is tried again
                assert peer.connections == dials + 1, kind
                for prompt, out in zip(prompts[kind], (first_try, within, after), strict=True):
                    assert out["num_cached_tokens"] == 0, kind  # nothing came from the bad peer
                    assert_same_greedy(expected[tuple(prompt)], out)
                # A load failed only where B dialled the peer: while its worker skipped the peer, B's
                # scheduler planned nothing from it (the request was computed at once).
                assert worker_total(second, "failed_loads") - failed == peer.connections, kind
                named = [line for line in second.call("warnings") if str(peer.address) in line]
                assert len(named) == 1 and why in named[0], (kind, named)
            finally:
                peer.close()
    finally:
        registry.close()


def peer_tier_up(engine) -> bool:
    return engine.call("connector_state", settle=False)["tiers"]["peer"]["up"]


def test_with_the_registry_hung_both_engines_serve_from_their_own_tiers_and_sharing_resumes(pair, redis):
    first, second = pair
    own_a, own_b, fresh = (random_prompt(300, seed=seed) for seed in (40, 41, 42))
    cold_a = computed_and_published(first, redis, own_a)
    cold_b = computed_and_published(second, redis, own_b)
    redis.pause()  # SIGSTOP: connections hang, as a registry that stopped answering
    try:
        started = time.monotonic()
        again_a, again_b = one(first, own_a), one(second, own_b)
        fresh_a, fresh_b = one(first, fresh), one(second, fresh)
        elapsed = time.monotonic() - started
        down = [peer_tier_up(first), peer_tier_up(second)]
    finally:
        redis.resume()
    assert elapsed < 10, f"{elapsed:.1f} s with a hung registry"  # each lookup's deadline is 300 ms
    assert down == [False, False]  # each marked its peer tier down (one warning) and went on
    for cold, again in ((cold_a, again_a), (cold_b, again_b)):
        assert again["num_cached_tokens"] == 300 // BLOCK * BLOCK  # from its own memory
        assert_same_greedy(cold, again)
    assert fresh_b["num_cached_tokens"] == 0  # A's chunks cannot be found: recomputed
    assert_same_greedy(fresh_a, fresh_b)
    deadline = time.monotonic() + 30  # the probes back off (0.5 s, doubling) while it is down
    seed = 200
    while True:
        seed += 1
        shared = random_prompt(300, seed=seed)
        cold = computed_and_published(first, redis, shared)
        warm = one(second, shared)
        if warm["num_cached_tokens"] > 0:
            break
        assert time.monotonic() < deadline, "sharing did not resume after the registry came back"
        time.sleep(0.5)
    assert warm["num_cached_tokens"] == 300 // BLOCK * BLOCK
    assert_same_greedy(cold, warm)
    # Each engine's view comes back up at its own next probe (backing off while the registry was
    # down) and is polled on a scheduler step: tiny requests make steps until both are up.
    deadline = time.monotonic() + 30
    while not (peer_tier_up(first) and peer_tier_up(second)):
        assert time.monotonic() < deadline, "the peer tier was not marked up again"
        for engine in pair:
            engine.generate([[5, 6, 7]], max_tokens=1)
        time.sleep(0.2)


def test_a_peer_killed_mid_run_is_a_recompute_and_it_stops_being_a_holder_within_the_live_ttl(pair, redis):
    """Last in the module: it kills engine A. Its entries outlive it; its liveness key does not
    (``LIVE_TTL_S``, 10 s: no setting shortens it), and once that is gone no lookup names A."""
    first, second = pair
    prompt = random_prompt(400, seed=8)
    cold = computed_and_published(first, redis, prompt)
    unasked = random_prompt(300, seed=11)  # A holds it too; B asks about it only once A is gone
    cold_unasked = computed_and_published(first, redis, unasked)
    instance = instance_of(first, redis)
    namespace, chunks = chunks_of(first, unasked)
    failed = worker_total(second, "failed_loads")
    first.kill()  # its registry entries live on until its liveness key expires
    killed = time.monotonic()
    recomputed = one(second, prompt)
    assert_same_greedy(cold, recomputed)
    assert worker_total(second, "failed_loads") > failed  # B tried the dead peer, then recomputed
    again = one(second, prompt)  # recomputed, stored in B's own memory
    assert again["num_cached_tokens"] == 400 // BLOCK * BLOCK
    assert_same_greedy(cold, again)
    with redis.admin() as admin:
        while admin.exists(live_key("lmc:", namespace, instance)):
            assert time.monotonic() - killed < LIVE_TTL_S + 1, "A's liveness key outlived the live TTL"
            time.sleep(0.1)
        assert all(admin.sismember(holders_key("lmc:", namespace, c.key.hex()), str(instance)) for c in chunks)
        failed = worker_total(second, "failed_loads")
        out = one(second, unasked)
        assert out["num_cached_tokens"] == 0
        assert worker_total(second, "failed_loads") == failed  # no holder named: A was not dialled again
        assert_same_greedy(cold_unasked, out)
        # B's lookup took the dead instance out of the sets it met.
        assert not any(admin.sismember(holders_key("lmc:", namespace, c.key.hex()), str(instance)) for c in chunks)
    registry = registry_of(redis, namespace)
    try:  # B holds the chunks now (it recomputed them): the registry names B, and only B
        assert [registry.holders(c.key) for c in chunks] == [(instance_of(second, redis),)] * len(chunks)
    finally:
        registry.close()
