"""The peer tier's pieces without a network: frames and requests, the token proofs, addresses and
instance ids, and the slot table that keeps torn bytes off the wire."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time

import pytest
from peer_support import NAMESPACE, REGIONS, ROW, PoolSource, make_chunk

from lmcache_connector.tiers.peer import auth
from lmcache_connector.tiers.peer.addresses import (
    InstanceId,
    PeerAddress,
    advertised_address,
    bind_address,
    parse_address,
    worker_rank,
)
from lmcache_connector.tiers.peer.protocol import (
    FRAME_BYTES,
    MAX_BLOCKS_PER_CHUNK,
    ChunkAsk,
    FrameType,
    PeerProtocolError,
    PeerRequest,
    frame_header,
    parse_frame_header,
    parse_request,
    request_bytes_bound,
    request_frame,
)


def _request(chunks: int = 3, blocks: int = 4) -> PeerRequest:
    asks = tuple(ChunkAsk(tuple(os.urandom(16) for _ in range(blocks))) for _ in range(chunks))
    return PeerRequest(bytes.fromhex(NAMESPACE), 1, 0, asks)


# ---------------------------------------------------------------- frames and requests


def test_a_request_survives_the_wire_exactly():
    request = _request()
    raw = request_frame(request, request_id=7)
    frame = parse_frame_header(raw[:FRAME_BYTES])
    assert (frame.type, frame.tag, frame.length) == (FrameType.REQUEST, 7, len(raw) - FRAME_BYTES)
    assert parse_request(raw[FRAME_BYTES:], max_chunks=64) == request
    assert len(raw) - FRAME_BYTES <= request_bytes_bound(3)


@pytest.mark.parametrize(
    "raw,problem",
    [
        (b"HTTP" + bytes(12), "no magic"),
        (struct.pack("<4sHBBII", b"LMCP", 2, 4, 0, 0, 0), "version 2"),
        (struct.pack("<4sHBBII", b"LMCP", 1, 99, 0, 0, 0), "unknown frame type 99"),
    ],
)
def test_a_frame_of_another_kind_is_refused_by_its_header(raw, problem):
    with pytest.raises(PeerProtocolError, match=problem):
        parse_frame_header(raw)


def test_requests_past_the_limits_or_malformed_are_refused():
    payload = request_frame(_request(chunks=3), 1)[FRAME_BYTES:]
    with pytest.raises(PeerProtocolError, match="1 to 2"):
        parse_request(payload, max_chunks=2)
    with pytest.raises(PeerProtocolError, match="trail"):
        parse_request(payload + b"\x00", max_chunks=64)
    with pytest.raises(PeerProtocolError):
        parse_request(payload[:-1], max_chunks=64)
    with pytest.raises(PeerProtocolError, match="shorter than its head"):
        parse_request(payload[:5], max_chunks=64)
    one_chunk_of_no_blocks = struct.pack("<16sHHHH", bytes(16), 0, 0, 1, 0)
    with pytest.raises(PeerProtocolError, match="a chunk of 0 blocks"):
        parse_request(one_chunk_of_no_blocks, max_chunks=64)
    with pytest.raises(ValueError, match="blocks"):
        request_frame(PeerRequest(bytes(16), 0, 0, (ChunkAsk(tuple(bytes(16) for _ in range(5000))),)), 1)


def test_the_bounds_are_what_a_server_reads_at_most():
    assert request_bytes_bound(64) == 22 + 64 * (2 + 16 * MAX_BLOCKS_PER_CHUNK)
    assert len(frame_header(FrameType.MISSING, 0)) == FRAME_BYTES == 16


# ---------------------------------------------------------------- the token


def test_proofs_need_the_token_and_are_fresh_and_one_way():
    token, server_nonce, client_nonce = b"t" * 32, auth.new_nonce(), auth.new_nonce()
    proof = auth.client_proof(token, server_nonce, client_nonce)
    assert auth.proof_matches(auth.client_proof(token, server_nonce, client_nonce), proof)
    assert not auth.proof_matches(auth.client_proof(b"u" * 32, server_nonce, client_nonce), proof)
    assert not auth.proof_matches(auth.client_proof(token, auth.new_nonce(), client_nonce), proof)  # replayed
    assert not auth.proof_matches(auth.server_proof(token, server_nonce, client_nonce), proof)  # reflected
    assert not auth.proof_matches(proof, proof[:16])
    assert token not in proof


# ---------------------------------------------------------------- addresses


def test_each_worker_serves_on_the_port_plus_its_rank():
    assert [worker_rank(tp, 2, pp) for pp in range(2) for tp in range(2)] == [0, 1, 2, 3]
    assert bind_address("0.0.0.0:8200", 3) == PeerAddress("0.0.0.0", 8203)
    assert str(bind_address("[::1]:8200", 1)) == "[::1]:8201"
    with pytest.raises(ValueError, match="LMCACHE_DISTRIBUTED_URL port 65535 \\+ worker rank 1"):
        bind_address("host:65535", 1)
    with pytest.raises(ValueError):
        worker_rank(2, 2, 0)


def test_the_advertised_host_replaces_a_wildcard_and_is_required_with_one():
    assert advertised_address("10.0.0.5:8200", None) == PeerAddress("10.0.0.5", 8200)
    assert advertised_address("0.0.0.0:8200", "10.0.0.7") == PeerAddress("10.0.0.7", 8200)
    assert str(advertised_address("[::]:8200", "fd00::7")) == "[fd00::7]:8200"
    with pytest.raises(ValueError, match="set LMCACHE_P2P_ADVERTISE_HOST"):
        advertised_address("0.0.0.0:8200", None)


def test_instance_ids_round_trip_and_planted_members_name_nobody():
    instance = InstanceId.new(PeerAddress("10.0.0.5", 8200))
    assert InstanceId.parse(str(instance)) == instance and InstanceId.parse(str(instance).encode()) == instance
    assert InstanceId.new(instance.address) != instance  # a restart is another incarnation
    v6 = InstanceId(PeerAddress("fd00::1", 1), "0a1b2c3d")
    assert InstanceId.parse(str(v6)) == v6
    for planted in ("10.0.0.5:8200", "10.0.0.5:8200/XYZ", "evil host:1/0a1b2c3d", "h:0/0a1b2c3d", b"\xff", "a" * 400):
        assert InstanceId.parse(planted) is None
    with pytest.raises(ValueError):
        parse_address("[::1]8200")


# ---------------------------------------------------------------- the slot table


def test_the_slot_table_serves_only_what_a_slot_still_holds():
    source = PoolSource(num_slots=2)
    chunk, later = make_chunk(), make_chunk(3)
    slot = source.add(chunk)
    scratch = bytearray(REGIONS * 4 * ROW)

    def take(n):
        return memoryview(scratch)[:n]

    copy = source.read(chunk.key, chunk.block_fps, take)
    assert copy is not None and bytes(copy.data) == chunk.data and copy.shape == chunk.shape
    lookalike = tuple(os.urandom(16) for _ in range(3)) + (chunk.key,)  # the same key, other blocks
    assert source.read(chunk.key, lookalike, take) is None
    source.table.overwriting(slot)  # the worker reuses the slot
    assert source.read(chunk.key, chunk.block_fps, take) is None and chunk.key not in source.table
    source.next_slot = slot
    source.add(later)
    assert bytes(source.read(later.key, later.block_fps, take).data) == later.data


def test_a_slot_rewritten_during_a_copy_never_serves_the_copy():
    """A writer keeps overwriting and refilling the slot while readers copy it: every copy a reader
    gets is exactly one chunk's bytes, never a mix."""
    source = PoolSource(num_slots=1)
    chunks = [make_chunk(), make_chunk()]
    source.add(chunks[0])
    source.during_copy = lambda slot: time.sleep(0)  # let the writer in between a copy's regions
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            i += 1
            source.next_slot = 0
            source.add(chunks[i % 2])
            time.sleep(0.0002)

    thread = threading.Thread(target=writer)
    thread.start()
    served = 0
    try:
        for _ in range(500):
            for chunk in chunks:
                scratch = bytearray(len(chunk.data))
                copy = source.read(chunk.key, chunk.block_fps, lambda n, s=scratch: memoryview(s)[:n])
                if copy is not None:
                    served += 1
                    assert bytes(copy.data) == chunk.data
    finally:
        stop.set()
        thread.join()
    assert served > 0


def test_the_peer_tier_imports_neither_torch_nor_vllm():
    modules = ", ".join(
        f"lmcache_connector.tiers.peer.{name}"
        for name in ("protocol", "auth", "source", "server", "client", "registry", "publisher", "view")
    )
    code = f"import sys, {modules}; print(sorted(m for m in ('torch', 'vllm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
