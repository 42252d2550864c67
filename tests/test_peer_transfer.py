"""Chunks fetched from a peer's server on loopback: into the caller's buffers and verified, with the
token or refused before any chunk, within the server's limits, and a peer that breaks is a bounded
miss (real sockets; the servers are threads of this process)."""

from __future__ import annotations

import logging
import socket
import time

import pytest
from peer_support import (
    BEHAVIOURS,
    NAMESPACE,
    OTHER_NAMESPACE,
    TOKEN,
    FakePeer,
    PoolSource,
    counts_reaching,
    frames,
    make_chunk,
    raw_handshake,
    recv_all,
    recv_exactly,
)

from lmcache_connector.tiers.peer import auth
from lmcache_connector.tiers.peer.addresses import PeerAddress
from lmcache_connector.tiers.peer.client import PeerClient, PeerHealth, fetch_from_holders
from lmcache_connector.tiers.peer.protocol import (
    FRAME_BYTES,
    ChunkAsk,
    ErrorCode,
    FrameType,
    PeerAuthError,
    PeerProtocolError,
    PeerRefusedError,
    PeerRequest,
    PeerUnavailableError,
    auth_frame,
    frame_header,
    parse_frame_header,
    request_frame,
)
from lmcache_connector.tiers.peer.server import PeerServer, ServerLimits
from lmcache_connector.tiers.remote.value import MAGIC as VALUE_MAGIC

LOOPBACK = PeerAddress("127.0.0.1", 0)
FAST = ServerLimits(handshake_timeout_s=0.5, idle_timeout_s=2.0, io_timeout_s=1.0)


@pytest.fixture
def source() -> PoolSource:
    return PoolSource()


def serve(source, token=None, limits=FAST, tp_rank=0, namespace=NAMESPACE, bind=LOOPBACK) -> PeerServer:
    return PeerServer(source, namespace, tp_rank, 0, bind, token=token, limits=limits).start()


@pytest.fixture
def server(source):
    srv = serve(source)
    yield srv
    srv.close()


@pytest.fixture
def client():
    c = PeerClient(NAMESPACE, 0)
    yield c
    c.close()


def test_a_client_reads_chunks_into_its_buffers_and_verifies_them(source, server, client):
    chunks = [make_chunk(4), make_chunk(2), make_chunk(4)]  # a partial chunk among whole ones
    for chunk in chunks:
        source.add(chunk)
    absent = make_chunk(4)
    wanted = [*chunks[:2], absent, chunks[2]]
    pairs = [chunk.want() for chunk in wanted]
    result = client.fetch(server.address, [want for want, _ in pairs], timeout_s=2)
    assert result.error is None and result.found == [True, True, False, True]
    for chunk, (_, buffer), found in zip(wanted, pairs, result.found, strict=True):
        if found:
            assert bytes(buffer) == chunk.data
    assert result.nbytes == sum(len(c.data) for c in chunks)
    counts = counts_reaching(server.take_counts, peer_served_chunks=3, peer_served_misses=1)
    assert counts["peer_served_chunks"] == 3 and counts["peer_served_misses"] == 1


def test_more_chunks_than_a_request_takes_are_asked_in_turns_on_one_connection(source, client):
    server = serve(source, limits=ServerLimits(max_chunks_per_request=2))
    try:
        chunks = [make_chunk() for _ in range(5)]
        for chunk in chunks:
            source.add(chunk)
        pairs = [chunk.want() for chunk in chunks]
        for _ in range(2):
            result = client.fetch(server.address, [want for want, _ in pairs], timeout_s=2)
            assert result.found == [True] * 5
        assert [bytes(buffer) for _, buffer in pairs] == [chunk.data for chunk in chunks]
        assert server.take_counts()["peer_connections"] == 1  # kept open and reused
    finally:
        server.close()


def test_a_chunk_evicted_while_it_is_copied_is_a_miss_never_torn_bytes(source, server, client):
    chunk, other = make_chunk(), make_chunk()
    slot = source.add(chunk)
    source.add(other)
    source.during_copy = lambda copying: copying == slot and source.table.overwriting(slot)
    pairs = [chunk.want(), other.want()]
    result = client.fetch(server.address, [want for want, _ in pairs], timeout_s=2)
    assert result.error is None and result.found == [False, True]
    assert bytes(pairs[1][1]) == other.data
    source.during_copy = None
    assert client.fetch(server.address, [chunk.want()[0]], timeout_s=2).found == [False]  # gone since


def test_chunks_are_sent_straight_from_their_memory_slots(client):
    source = PoolSource(lending=True)
    server = serve(source)
    try:
        chunks = [make_chunk(), make_chunk(2)]
        for chunk in chunks:
            source.add(chunk)
        pairs = [chunk.want() for chunk in chunks]
        result = client.fetch(server.address, [want for want, _ in pairs], timeout_s=2)
        assert result.error is None and result.found == [True, True]
        assert [bytes(buffer) for _, buffer in pairs] == [chunk.data for chunk in chunks]
        assert source.copies == 0  # hashed and sent in place, no copy
    finally:
        server.close()


def test_a_slot_rewritten_while_its_chunk_is_sent_is_a_miss_and_the_connection_goes_on(client):
    source = PoolSource(lending=True)
    server = serve(source)
    try:
        chunk, other = make_chunk(), make_chunk()
        slot = source.add(chunk)
        source.add(other)
        source.during_send = lambda key: key == chunk.key and source.rewrite(slot)  # torn bytes go out
        pairs = [chunk.want(), other.want()]
        result = client.fetch(server.address, [want for want, _ in pairs], timeout_s=2)
        assert result.error is None and result.found == [False, True]  # TORN: a miss, not a broken peer
        assert bytes(pairs[1][1]) == other.data
        source.during_send = None
        assert client.fetch(server.address, [chunk.want()[0]], timeout_s=2).found == [False]  # gone since
        assert server.take_counts()["peer_served_misses"] == 2
    finally:
        server.close()


def test_a_chunk_asked_with_other_block_fingerprints_is_a_miss(source, server, client):
    chunk = make_chunk()
    source.add(chunk)
    lookalike = type(chunk)((make_chunk(3).block_fps + (chunk.key,)), chunk.data)  # same key, other blocks
    assert client.fetch(server.address, [lookalike.want()[0]], timeout_s=2).found == [False]


def test_a_request_for_another_namespace_or_rank_is_refused(source, server):
    chunk = make_chunk()
    source.add(chunk)
    for other in (PeerClient(OTHER_NAMESPACE, 0), PeerClient(NAMESPACE, 1)):
        result = other.fetch(server.address, [chunk.want()[0]], timeout_s=2)
        assert result.found == [False]
        assert isinstance(result.error, PeerRefusedError) and result.error.code == ErrorCode.WRONG_NAMESPACE


# ---------------------------------------------------------------- authentication


def test_with_the_token_on_both_sides_chunks_arrive(source):
    server = serve(source, token=TOKEN)
    try:
        chunk = make_chunk()
        source.add(chunk)
        want, buffer = chunk.want()
        result = PeerClient(NAMESPACE, 0, token=TOKEN).fetch(server.address, [want], timeout_s=2)
        assert result.found == [True] and bytes(buffer) == chunk.data
    finally:
        server.close()


@pytest.mark.parametrize("token", [None, b"not-the-token-of-the-deployment!"], ids=["no token", "wrong token"])
def test_a_client_without_the_right_token_gets_nothing(source, token):
    server = serve(source, token=TOKEN)
    try:
        chunk = make_chunk()
        source.add(chunk)
        result = PeerClient(NAMESPACE, 0, token=token).fetch(server.address, [chunk.want()[0]], timeout_s=2)
        assert result.found == [False] and isinstance(result.error, PeerAuthError)
        assert server.take_counts().get("peer_served_chunks", 0) == 0
    finally:
        server.close()


def test_a_wrong_proof_is_refused_before_any_chunk_byte_is_sent(source):
    server = serve(source, token=TOKEN)
    try:
        chunk = make_chunk()
        source.add(chunk)
        with socket.create_connection((server.address.host, server.address.port), timeout=2) as sock:
            hello = parse_frame_header(recv_exactly(sock, FRAME_BYTES))
            assert hello.flags == 1  # authentication required
            server_nonce = recv_exactly(sock, hello.length)
            client_nonce = auth.new_nonce()
            guess = auth.client_proof(b"a-guess-at-the-token-0123456789!", server_nonce, client_nonce)
            ask = PeerRequest(bytes.fromhex(NAMESPACE), 0, 0, (ChunkAsk(chunk.block_fps),))
            # A wrong proof, and a request right behind it without waiting for the verdict.
            sock.sendall(auth_frame(client_nonce, guess) + request_frame(ask, 1))
            received = recv_all(sock)
        (kind, tag, message), *rest = frames(received)
        assert kind == FrameType.ERROR and tag == ErrorCode.AUTH_REFUSED and b"TOKEN" in message and not rest
        assert VALUE_MAGIC not in received
    finally:
        server.close()


def test_a_client_with_the_token_refuses_a_server_that_cannot_prove_it(source, server):
    chunk = make_chunk()
    source.add(chunk)
    result = PeerClient(NAMESPACE, 0, token=TOKEN).fetch(server.address, [chunk.want()[0]], timeout_s=2)
    assert result.found == [False] and isinstance(result.error, PeerAuthError)
    assert "could not prove" in str(result.error)


# ---------------------------------------------------------------- limits and timeouts


def _raw_request(server: PeerServer, payload_frame: bytes) -> list:
    with socket.create_connection((server.address.host, server.address.port), timeout=2) as sock:
        raw_handshake(sock)
        sock.sendall(payload_frame)
        return frames(recv_all(sock))


def test_a_request_frame_past_the_bound_is_refused_and_the_connection_closed(source, server):
    answer = _raw_request(server, frame_header(FrameType.REQUEST, 1 << 30, tag=1))
    assert [(kind, tag) for kind, tag, _ in answer] == [(FrameType.ERROR, ErrorCode.BAD_REQUEST)]


def test_a_request_for_too_many_chunks_is_refused(source):
    server = serve(source, limits=ServerLimits(max_chunks_per_request=2))
    try:
        asks = tuple(ChunkAsk(make_chunk().block_fps) for _ in range(3))
        answer = _raw_request(server, request_frame(PeerRequest(bytes.fromhex(NAMESPACE), 0, 0, asks), 1))
        assert [(kind, tag) for kind, tag, _ in answer] == [(FrameType.ERROR, ErrorCode.BAD_REQUEST)]
        assert b"1 to 2" in answer[0][2]
    finally:
        server.close()


def test_garbage_instead_of_a_request_closes_the_connection(source, server):
    answer = _raw_request(server, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [kind for kind, _, _ in answer] == [FrameType.ERROR]


def test_connections_past_the_maximum_are_refused_busy(source):
    server = serve(source, limits=ServerLimits(max_connections=1, handshake_timeout_s=2))
    try:
        with socket.create_connection((server.address.host, server.address.port), timeout=2):
            time.sleep(0.05)  # the first connection holds the only slot (in its handshake)
            result = PeerClient(NAMESPACE, 0).fetch(server.address, [make_chunk().want()[0]], timeout_s=2)
        assert isinstance(result.error, PeerRefusedError) and result.error.code == ErrorCode.BUSY
    finally:
        server.close()


def test_a_client_that_never_finishes_the_handshake_is_dropped(source, server):
    with socket.create_connection((server.address.host, server.address.port), timeout=3) as sock:
        started = time.monotonic()
        received = recv_all(sock, timeout=3)
        elapsed = time.monotonic() - started
    assert [kind for kind, _, _ in frames(received)] == [FrameType.HELLO]
    assert FAST.handshake_timeout_s * 0.8 < elapsed < FAST.handshake_timeout_s + 0.5


# ---------------------------------------------------------------- peers that break


@pytest.mark.parametrize("behaviour", sorted(BEHAVIOURS))
def test_a_broken_peer_is_a_bounded_miss_with_a_clear_error(behaviour):
    chunks = [make_chunk(), make_chunk()]
    peer = FakePeer(BEHAVIOURS[behaviour], chunks)
    client = PeerClient(NAMESPACE, 0)
    try:
        want, _ = chunks[0].want()
        started = time.monotonic()
        result = client.fetch(peer.address, [want], timeout_s=0.3)
        elapsed = time.monotonic() - started
        assert result.found == [False] and elapsed < 0.6
        expected = PeerUnavailableError if behaviour in ("dies mid-transfer", "never answers") else PeerProtocolError
        assert isinstance(result.error, expected), result.error
        assert str(peer.address) in str(result.error)
    finally:
        client.close()
        peer.close()


def test_a_peer_that_never_says_hello_is_a_bounded_miss():
    peer = FakePeer(lambda sock, chunks: time.sleep(1), handshake=False)
    try:
        started = time.monotonic()
        result = PeerClient(NAMESPACE, 0).fetch(peer.address, [make_chunk().want()[0]], timeout_s=0.2)
        assert isinstance(result.error, PeerUnavailableError) and time.monotonic() - started < 0.5
    finally:
        peer.close()


def test_a_peer_that_is_not_there_is_a_miss():
    with socket.create_server(("127.0.0.1", 0)) as probe:
        gone = PeerAddress("127.0.0.1", probe.getsockname()[1])
    result = PeerClient(NAMESPACE, 0).fetch(gone, [make_chunk().want()[0]], timeout_s=1)
    assert result.found == [False] and isinstance(result.error, PeerUnavailableError)


def test_the_next_holder_is_tried_and_a_bad_one_skipped_with_one_warning(source, server, client, caplog):
    chunk = make_chunk()
    source.add(chunk)
    bad = FakePeer(BEHAVIOURS["garbage"], [chunk])
    health = PeerHealth()
    try:
        with caplog.at_level(logging.WARNING, logger="lmcache_connector"):
            for _ in range(3):
                want, buffer = chunk.want()
                assert fetch_from_holders(client, health, [bad.address, server.address], [want], 2) == [True]
                assert bytes(buffer) == chunk.data
        assert bad.connections == 1  # skipped after it went bad
        assert health.bad_peers() == [str(bad.address)]
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and str(bad.address) in warnings[0].getMessage()
        assert health.take_counts() == {"peer_failures": 1}
    finally:
        bad.close()


def test_a_bad_peer_is_tried_again_after_its_back_off_and_doubles_it_when_still_bad():
    health = PeerHealth(first_s=0.05, max_s=1.0)
    health.failed("p:1", RuntimeError("x"))
    assert not health.usable("p:1")
    assert health.take_news() == {"p:1": 0.05} and health.take_news() == {}  # for the scheduler, once
    time.sleep(0.06)
    assert health.usable("p:1")
    health.failed("p:1", RuntimeError("again"))  # no second warning; 0.1 s now
    assert health.take_news() == {"p:1": 0.1}
    time.sleep(0.06)
    assert not health.usable("p:1")
    health.succeeded("p:1")
    assert health.usable("p:1") and health.bad_peers() == []


# ---------------------------------------------------------------- lifetime


def test_closing_the_server_ends_its_connections_and_frees_the_port(source, client):
    server = serve(source)
    chunk = make_chunk()
    source.add(chunk)
    assert client.fetch(server.address, [chunk.want()[0]], timeout_s=2).found == [True]  # a pooled connection
    address = server.address
    started = time.monotonic()
    server.close()
    assert time.monotonic() - started < 1.0
    result = client.fetch(address, [chunk.want()[0]], timeout_s=1)
    assert isinstance(result.error, PeerUnavailableError)
    again = serve(source, bind=address)  # the port is free again
    try:
        assert client.fetch(address, [chunk.want()[0]], timeout_s=2).found == [True]
    finally:
        again.close()


def test_a_wildcard_host_serves_every_interface(source, client):
    server = serve(source, bind=PeerAddress("0.0.0.0", 0))
    try:
        chunk = make_chunk()
        source.add(chunk)
        loopback = PeerAddress("127.0.0.1", server.address.port)
        assert client.fetch(loopback, [chunk.want()[0]], timeout_s=2).found == [True]
    finally:
        server.close()
