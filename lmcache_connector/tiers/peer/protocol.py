"""The peer protocol: framed binary messages over TCP, bounded in size and in time.

Every message is a frame: a 16-byte header, then ``length`` bytes of payload. Integers are
little-endian::

    4 bytes   magic b"LMCP"
    2 bytes   protocol version (VERSION)
    1 byte    frame type (FrameType)
    1 byte    flags (HELLO: bit 0, the server requires authentication)
    4 bytes   tag: the request id (REQUEST), the chunk's index in its request (FOUND, MISSING),
              the error code (ERROR); 0 otherwise
    4 bytes   payload length, at most the bound of the frame's type

A connection, the server speaking first::

    server  HELLO    32-byte nonce                                 flags: auth required
    client  AUTH     32-byte client nonce, 32-byte proof           (zeros without a token)
    server  WELCOME  32-byte server proof (zeros without a token), u16 max chunks per request, u16 0
            -- or ERROR AUTH_REFUSED and the connection closes: no chunk is ever sent before this --
    client  REQUEST  16-byte namespace digest, u16 tp_rank, u16 pp_rank, u16 n, then n times:
                     u16 b (1..MAX_BLOCKS_PER_CHUNK), b 16-byte block fingerprints (the last is the
                     chunk's key)
    server  n answers in request order, each one of
            FOUND     the chunk's value, in the remote tier's value format (a versioned header with
                      namespace, rank, key, block fingerprints, shape and an xxh3 checksum, then the
                      raw bytes), from a copy the server confirmed before sending it (a disk file);
            SENT      the same value sent straight from where the server holds it (a memory slot),
                      then a trailer frame: CONFIRMED (the slot held exactly those bytes for the
                      whole send: the value is the chunk) or TORN (the slot was rewritten meanwhile:
                      a miss; the bytes received must not be used);
            MISSING   no payload
    ...     more REQUESTs on the same connection, or a close by either side

ERROR frames carry an ASCII message (at most MAX_ERROR_BYTES) and always end the connection.

Promises, on both sides:

* no pickle, no JSON of unbounded size: headers are fixed structs; the only JSON is the value's
  header, bounded by :data:`~lmcache_connector.tiers.remote.value.MAX_HEADER_BYTES` and parsed by
  :mod:`~lmcache_connector.tiers.remote.value`;
* a SENT value counts only with its CONFIRMED trailer: bytes a slot held while being rewritten are
  never used, even when their checksum happens to match (TORN), and a SENT value whose checksum does
  not match yet is CONFIRMED is a broken peer;
* every read is exact-length and under a deadline (:meth:`Wire.recv_exact`); a frame whose magic,
  version, type, tag or length is not what the protocol allows at that point raises
  :class:`PeerProtocolError`, and whoever catches any :class:`PeerError` closes the connection:
  a stream that went out of step is never read again.

Standard library only.
"""

from __future__ import annotations

import math
import select
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from lmcache_connector.keys import FINGERPRINT_BYTES
from lmcache_connector.tiers.remote.value import MAX_ENTRY_BLOCKS

MAGIC = b"LMCP"
VERSION = 1  # SENT / CONFIRMED / TORN came later in 1: an older client refuses them (a miss)
_MAX_IOV = 512  # buffers per sendmsg, under every kernel's IOV_MAX (1024 on Linux)
_TIMEVAL = struct.Struct("@ll")  # struct timeval: seconds, microseconds (SO_RCVTIMEO / SO_SNDTIMEO)
_FRAME = struct.Struct("<4sHBBII")  # magic, version, type, flags, tag, length
FRAME_BYTES = _FRAME.size

NONCE_BYTES = 32
PROOF_BYTES = 32
FLAG_AUTH_REQUIRED = 1

MAX_CHUNKS_PER_REQUEST = 64  # a server's default; it announces its own in WELCOME
MAX_BLOCKS_PER_CHUNK = MAX_ENTRY_BLOCKS
MAX_ERROR_BYTES = 1024
DEFAULT_MAX_VALUE_BYTES = 1 << 30  # a client's bound on one FOUND frame, besides the chunk's own size

_AUTH = struct.Struct(f"<{NONCE_BYTES}s{PROOF_BYTES}s")
_WELCOME = struct.Struct(f"<{PROOF_BYTES}sHH")
_REQUEST_HEAD = struct.Struct(f"<{FINGERPRINT_BYTES}sHHH")  # namespace digest, tp rank, pp rank, chunks
_BLOCKS = struct.Struct("<H")
_ZERO_PROOF = bytes(PROOF_BYTES)


class FrameType(IntEnum):
    HELLO = 1
    AUTH = 2
    WELCOME = 3
    REQUEST = 4
    FOUND = 5
    MISSING = 6
    ERROR = 7
    SENT = 8
    CONFIRMED = 9
    TORN = 10


class ErrorCode(IntEnum):
    AUTH_REFUSED = 1  # no token, or a wrong one
    BUSY = 2  # the server serves its maximum of connections
    WRONG_NAMESPACE = 3  # the request names another model or rank than this server holds
    BAD_REQUEST = 4  # a request past the server's limits
    SHUTTING_DOWN = 5


def request_bytes_bound(max_chunks: int) -> int:
    """The largest REQUEST payload a server taking ``max_chunks`` per request reads."""
    return _REQUEST_HEAD.size + max_chunks * (_BLOCKS.size + FINGERPRINT_BYTES * MAX_BLOCKS_PER_CHUNK)


# ---------------------------------------------------------------- errors


class PeerError(Exception):
    """A peer could not deliver; the connection it happened on is closed. To the tier, a miss."""


class PeerUnavailableError(PeerError):
    """The peer refused the connection, timed out, or closed it."""


class PeerProtocolError(PeerError):
    """The peer sent what the protocol does not allow here (garbage, a frame too large, a corrupt
    chunk): it is not a peer of this version, or it is broken."""


class PeerAuthError(PeerError):
    """The peer refused our proof of the token, or could not prove it knows the token."""


class PeerRefusedError(PeerError):
    """The peer answered with an ERROR frame (busy, another namespace, a request past its limits)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- frames


@dataclass(frozen=True)
class Frame:
    type: FrameType
    flags: int
    tag: int
    length: int


def frame_header(kind: FrameType, length: int, tag: int = 0, flags: int = 0) -> bytes:
    return _FRAME.pack(MAGIC, VERSION, kind, flags, tag, length)


def parse_frame_header(raw: bytes | memoryview) -> Frame:
    """The header's fields, checked for magic, version and type (bounds are the reader's)."""
    magic, version, kind, flags, tag, length = _FRAME.unpack(raw)
    if magic != MAGIC:
        raise PeerProtocolError("not a peer of this library (no magic)")
    if version != VERSION:
        raise PeerProtocolError(f"the peer speaks protocol version {version}; this side speaks {VERSION}")
    try:
        kind = FrameType(kind)
    except ValueError:
        raise PeerProtocolError(f"unknown frame type {kind}") from None
    return Frame(kind, flags, tag, length)


def error_frame(code: ErrorCode, message: str) -> bytes:
    payload = message.encode("ascii", "replace")[:MAX_ERROR_BYTES]
    return frame_header(FrameType.ERROR, len(payload), tag=code) + payload


def hello_frame(nonce: bytes, auth_required: bool) -> bytes:
    return frame_header(FrameType.HELLO, NONCE_BYTES, flags=FLAG_AUTH_REQUIRED if auth_required else 0) + nonce


def auth_frame(client_nonce: bytes, proof: bytes | None) -> bytes:
    return frame_header(FrameType.AUTH, _AUTH.size) + _AUTH.pack(client_nonce, proof or _ZERO_PROOF)


def parse_auth(payload: bytes) -> tuple[bytes, bytes]:
    return _AUTH.unpack(payload)


def welcome_frame(proof: bytes | None, max_chunks: int) -> bytes:
    return frame_header(FrameType.WELCOME, _WELCOME.size) + _WELCOME.pack(proof or _ZERO_PROOF, max_chunks, 0)


def parse_welcome(payload: bytes) -> tuple[bytes, int]:
    proof, max_chunks, _reserved = _WELCOME.unpack(payload)
    if max_chunks < 1:
        raise PeerProtocolError("the peer takes no chunks per request")
    return proof, max_chunks


# ---------------------------------------------------------------- requests


@dataclass(frozen=True)
class ChunkAsk:
    """One chunk asked for: every block-boundary fingerprint; the last is the chunk's key."""

    block_fps: tuple[bytes, ...]

    @property
    def key(self) -> bytes:
        return self.block_fps[-1]


@dataclass(frozen=True)
class PeerRequest:
    """Chunks of one namespace and rank, which the server must hold as exactly that."""

    namespace: bytes  # the rank-less namespace digest (16 bytes)
    tp_rank: int
    pp_rank: int
    chunks: tuple[ChunkAsk, ...]


def request_frame(request: PeerRequest, request_id: int) -> bytes:
    parts = [_REQUEST_HEAD.pack(request.namespace, request.tp_rank, request.pp_rank, len(request.chunks))]
    for ask in request.chunks:
        if not 1 <= len(ask.block_fps) <= MAX_BLOCKS_PER_CHUNK:
            raise ValueError(f"a chunk of {len(ask.block_fps)} blocks; 1 to {MAX_BLOCKS_PER_CHUNK} are allowed")
        parts.append(_BLOCKS.pack(len(ask.block_fps)))
        parts.extend(ask.block_fps)
    payload = b"".join(parts)
    return frame_header(FrameType.REQUEST, len(payload), tag=request_id) + payload


def parse_request(payload: bytes, max_chunks: int) -> PeerRequest:
    """The request in ``payload``, every count and length checked against the limits."""
    if len(payload) < _REQUEST_HEAD.size:
        raise PeerProtocolError(f"a request of {len(payload)} bytes: shorter than its head")
    namespace, tp_rank, pp_rank, count = _REQUEST_HEAD.unpack_from(payload)
    if not 1 <= count <= max_chunks:
        raise PeerProtocolError(f"a request for {count} chunks; this server takes 1 to {max_chunks}")
    offset = _REQUEST_HEAD.size
    chunks = []
    for _ in range(count):
        if offset + _BLOCKS.size > len(payload):
            raise PeerProtocolError("a request cut short inside its chunk list")
        (blocks,) = _BLOCKS.unpack_from(payload, offset)
        offset += _BLOCKS.size
        end = offset + blocks * FINGERPRINT_BYTES
        if not 1 <= blocks <= MAX_BLOCKS_PER_CHUNK or end > len(payload):
            raise PeerProtocolError(f"a chunk of {blocks} blocks in a request of {len(payload)} bytes")
        chunks.append(
            ChunkAsk(tuple(payload[i : i + FINGERPRINT_BYTES] for i in range(offset, end, FINGERPRINT_BYTES)))
        )
        offset = end
    if offset != len(payload):
        raise PeerProtocolError(f"{len(payload) - offset} bytes trail the request")
    return PeerRequest(namespace, tp_rank, pp_rank, tuple(chunks))


# ---------------------------------------------------------------- the wire


class Wire:
    """A connected socket read and written under deadlines (``time.monotonic()`` values).

    A send blocks, bounded by the kernel to what is left of the deadline (``SO_SNDTIMEO``, set
    before the call), and gathers every piece of a frame into one call however many segments they
    take; a read takes what has arrived (``MSG_DONTWAIT``) and polls, within the deadline, only when
    nothing has. A transfer in full flow costs one system call per read, as a plain socket does (a
    Python socket timeout costs three: setting it, a poll, the read). (In one engine run with
    ``MSG_WAITALL`` reads, a new engine's fetches from a peer took twice as long.) Every failure raises a
    :class:`PeerError`; the owner then calls :meth:`close` and never uses the wire again."""

    def __init__(self, sock: socket.socket, peer: str):
        self.sock = sock
        self.peer = peer  # for messages
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small frames go out at once
        sock.settimeout(None)  # blocking: the kernel's timeout bounds every send
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)

    def recv_exact(self, view: memoryview, deadline: float) -> None:
        """Fill ``view`` exactly, or raise :class:`PeerUnavailableError` (closed, timed out)."""
        got = 0
        while got < len(view):
            if time.monotonic() >= deadline:  # a peer that trickles bytes is bounded too
                raise PeerUnavailableError(f"{self.peer} sent nothing in time")
            try:
                n = self.sock.recv_into(view[got:], 0, socket.MSG_DONTWAIT)
            except BlockingIOError:  # nothing there yet: wait for it, within the deadline
                self._wait_readable(deadline)
                continue
            except OSError as exc:
                raise PeerUnavailableError(f"{self.peer}: {type(exc).__name__}: {exc}") from None
            if n == 0:
                raise PeerUnavailableError(f"{self.peer} closed the connection")
            got += n

    def recv_bytes(self, length: int, deadline: float) -> bytes:
        buffer = bytearray(length)
        self.recv_exact(memoryview(buffer), deadline)
        return bytes(buffer)

    def recv_frame(self, deadline: float, allowed: dict[FrameType, int]) -> Frame:
        """The next frame's header, whose type must be one of ``allowed`` (type -> largest payload).

        An ERROR frame is read here and raised: :class:`PeerAuthError` for a refused proof,
        :class:`PeerRefusedError` for the others."""
        try:
            frame = parse_frame_header(self.recv_bytes(FRAME_BYTES, deadline))
        except PeerProtocolError as exc:
            raise PeerProtocolError(f"{self.peer}: {exc}") from None
        if frame.type == FrameType.ERROR:
            if frame.length > MAX_ERROR_BYTES:
                raise PeerProtocolError(f"{self.peer} sent an error of {frame.length} bytes")
            message = self.recv_bytes(frame.length, deadline).decode("ascii", "replace")
            if frame.tag == ErrorCode.AUTH_REFUSED:
                raise PeerAuthError(f"{self.peer} refused the connection: {message}")
            raise PeerRefusedError(frame.tag, f"{self.peer} refused: {message}")
        bound = allowed.get(frame.type)
        if bound is None:
            raise PeerProtocolError(f"{self.peer} sent {frame.type.name} where {_names(allowed)} belongs")
        if frame.length > bound:
            raise PeerProtocolError(
                f"{self.peer} sent a {frame.type.name} frame of {frame.length} bytes; at most {bound} are allowed"
            )
        return frame

    def send(self, pieces: Sequence[bytes | memoryview], deadline: float) -> None:
        """Send every piece, in order, before the deadline (gathered: one call for all of them, as
        for one buffer, unless the kernel takes them in parts)."""
        views = []
        for piece in pieces:
            view = memoryview(piece)
            views.append(view if view.format == "B" and view.ndim == 1 else view.cast("B"))
        while views:
            self._bound(socket.SO_SNDTIMEO, deadline, "took nothing in time")
            try:
                sent = self.sock.sendmsg(views[:_MAX_IOV])
            except BlockingIOError:  # the kernel's timeout passed with nothing sent
                continue
            except OSError as exc:
                raise PeerUnavailableError(f"{self.peer}: {type(exc).__name__}: {exc}") from None
            while views and sent >= len(views[0]):
                sent -= len(views.pop(0))
            if sent:
                views[0] = views[0][sent:]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _bound(self, option: int, deadline: float, what: str) -> None:
        """The next call on the socket waits at most until ``deadline`` (raises once it has passed)."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise PeerUnavailableError(f"{self.peer} {what}")
        seconds = int(left)
        micros = int((left - seconds) * 1_000_000)
        if seconds == micros == 0:
            micros = 1  # a zero timeval means "wait forever"
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, option, _TIMEVAL.pack(seconds, micros))
        except OSError as exc:  # closed under us (the server's shutdown)
            raise PeerUnavailableError(f"{self.peer}: {type(exc).__name__}: {exc}") from None

    def _wait_readable(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise PeerUnavailableError(f"{self.peer} sent nothing in time")
        try:
            ready = self._poll.poll(max(1, math.ceil(left * 1000)))
        except (OSError, ValueError) as exc:  # closed under us (the server's shutdown)
            raise PeerUnavailableError(f"{self.peer}: {type(exc).__name__}: {exc}") from None
        if not ready:
            raise PeerUnavailableError(f"{self.peer} sent nothing in time")


def _names(allowed: dict[FrameType, int]) -> str:
    return " or ".join(kind.name for kind in allowed)
