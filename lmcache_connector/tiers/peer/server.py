"""One worker rank's peer server: answers "give me these chunks" from a :class:`~.source.ChunkSource`.

A :class:`PeerServer` listens on one TCP address (``LMCACHE_DISTRIBUTED_URL`` port + the worker's
rank, :mod:`.addresses`; a wildcard host binds every interface) and serves each connection on a
thread of a bounded pool, speaking :mod:`.protocol`. What it promises:

* **bounded**: at most ``max_connections`` connections are served at once (one more is answered
  ERROR BUSY and closed at once); a request names at most ``max_chunks_per_request`` chunks of at
  most :data:`~.protocol.MAX_BLOCKS_PER_CHUNK` blocks, so its frame is bounded too; each connection
  holds one scratch buffer of the largest chunk it sent;
* **timed**: the handshake must finish within ``handshake_timeout_s``; an idle connection is closed
  after ``idle_timeout_s``; a request must arrive, and each answer be taken, within ``io_timeout_s``.
  A slow or silent client costs one pool thread for that long, never the worker;
* **authenticated first**: with a token, a client's proof is checked before any request is read
  (:mod:`.auth`); a wrong or missing proof gets ERROR AUTH_REFUSED, never a chunk;
* **strict**: a frame that breaks the protocol, a request of another namespace or rank (ERROR
  WRONG_NAMESPACE), or one past the limits closes the connection;
* **never torn**: a chunk the source lends in place (a memory slot: :meth:`.source.ChunkSource.lend`)
  is hashed and sent from there, then CONFIRMED only if the slot was not rewritten meanwhile (else
  TORN: a miss for the client); any other is sent only as the source's confirmed copy (copy, then
  confirm: :mod:`.source`), hashed after the copy; a chunk changed during the copy is MISSING;
* **clean shutdown**: :meth:`PeerServer.close` stops accepting, closes every connection (a
  transfer in progress ends; its client sees a closed connection, a miss) and joins the threads.

Counters (chunks and bytes served, misses, refused connections) come out of :meth:`take_counts`.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lmcache_connector.keys import rank_tag
from lmcache_connector.tiers.peer import auth
from lmcache_connector.tiers.peer.addresses import PeerAddress
from lmcache_connector.tiers.peer.protocol import (
    FRAME_BYTES,
    NONCE_BYTES,
    PROOF_BYTES,
    ErrorCode,
    Frame,
    FrameType,
    PeerError,
    PeerProtocolError,
    PeerRequest,
    Wire,
    error_frame,
    frame_header,
    hello_frame,
    parse_auth,
    parse_frame_header,
    parse_request,
    request_bytes_bound,
    welcome_frame,
)
from lmcache_connector.tiers.peer.source import ChunkSource, LentChunk
from lmcache_connector.tiers.remote.value import ValueHeader, encode_value

logger = logging.getLogger("lmcache_connector")

ACCEPT_POLL_S = 1.0  # how often the accept loop looks at the stop flag, besides being woken


@dataclass(frozen=True)
class ServerLimits:
    max_connections: int = 16
    max_chunks_per_request: int = 64
    handshake_timeout_s: float = 5.0
    idle_timeout_s: float = 60.0
    io_timeout_s: float = 10.0


class PeerServer:
    """Serves one rank's chunks of one namespace. ``start()`` binds and returns; ``close()`` stops."""

    def __init__(
        self,
        source: ChunkSource,
        namespace_hex: str,
        tp_rank: int,
        pp_rank: int,
        bind: PeerAddress,
        token: bytes | None = None,
        limits: ServerLimits = ServerLimits(),
    ):
        if not (1 <= limits.max_chunks_per_request <= 0xFFFF and limits.max_connections >= 1):
            raise ValueError(f"{limits}: 1 to 65535 chunks per request and at least one connection")
        self.source = source
        self.namespace_hex = namespace_hex
        self.namespace = bytes.fromhex(namespace_hex)
        self.tp_rank, self.pp_rank = tp_rank, pp_rank
        self.rank = rank_tag(tp_rank, pp_rank)
        self.bind = bind
        self.token = token
        self.limits = limits
        self._max_request = request_bytes_bound(limits.max_chunks_per_request)
        self._listener: socket.socket | None = None
        self._pool = ThreadPoolExecutor(limits.max_connections, thread_name_prefix="lmcache-peer-conn")
        self._slots = threading.BoundedSemaphore(limits.max_connections)
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._counts: dict[str, float] = {}

    @property
    def address(self) -> PeerAddress:
        """Where the server listens (the actual port when ``bind`` asked for port 0)."""
        assert self._listener is not None, "start() first"
        return PeerAddress(self.bind.host, self._listener.getsockname()[1])

    def start(self) -> PeerServer:
        family, kind, proto, _, where = socket.getaddrinfo(
            self.bind.host, self.bind.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        listener = socket.socket(family, kind, proto)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(where)
            listener.listen(max(16, self.limits.max_connections))
        except OSError as exc:
            listener.close()
            raise OSError(exc.errno, f"the peer server cannot listen on {self.bind}: {exc.strerror}") from None
        listener.setblocking(False)
        self._listener = listener
        self._waker, self._wake_up = socket.socketpair()  # close() writes here: the accept loop wakes at once
        self._thread = threading.Thread(target=self._accept_loop, name="lmcache-peer-server", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, end every connection and join the threads (at most ``timeout`` seconds each).
        Closing again does nothing."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._wake_up.send(b"x")
            self._thread.join(timeout)
            self._waker.close()
            self._wake_up.close()
        with self._lock:
            for sock in self._open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv or send
                except OSError:
                    pass
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._listener is not None:
            self._listener.close()

    def take_counts(self) -> dict[str, float]:
        with self._lock:
            counts, self._counts = self._counts, {}
        return counts

    # ------------------------------------------------------------ connections

    def _accept_loop(self) -> None:
        assert self._listener is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._waker, selectors.EVENT_READ)
            while not self._stop.is_set():
                if not selector.select(ACCEPT_POLL_S):
                    continue
                try:
                    sock, where = self._listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:  # out of file descriptors: wait, do not spin
                    logger.warning("lmcache_connector: the peer server on %s cannot accept: %s", self.bind, exc)
                    self._stop.wait(ACCEPT_POLL_S)
                    continue
                sock.setblocking(True)
                if not self._slots.acquire(blocking=False):
                    self._refuse(sock, ErrorCode.BUSY, "too many connections; try another holder or later")
                    continue
                with self._lock:
                    self._open.add(sock)
                self._count("peer_connections")
                try:
                    self._pool.submit(self._serve, sock, _name(where))
                except RuntimeError:  # shutting down
                    self._release(sock)

    def _refuse(self, sock: socket.socket, code: ErrorCode, message: str) -> None:
        self._count("refused_connections")
        try:
            sock.settimeout(0.05)
            sock.sendall(error_frame(code, message))
        except OSError:
            pass
        sock.close()

    def _release(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)
        sock.close()
        self._slots.release()

    def _serve(self, sock: socket.socket, peer: str) -> None:
        wire = Wire(sock, f"peer client {peer}")
        try:
            self._handshake(wire)
            scratch = bytearray()
            while not self._stop.is_set():
                request = self._next_request(wire)
                if request is None:
                    return
                scratch = self._answer(wire, request, scratch)
        except PeerProtocolError as exc:
            self._count("peer_bad_requests")
            logger.debug("lmcache_connector: closing the peer connection from %s: %s", peer, exc)
            try:  # say why before closing, where the client still listens
                wire.send([error_frame(ErrorCode.BAD_REQUEST, str(exc))], time.monotonic() + 0.05)
            except PeerError:
                pass
        except PeerError as exc:
            logger.debug("lmcache_connector: peer connection from %s ended: %s", peer, exc)
        except Exception:  # a bug must end this connection, never the server
            logger.exception("lmcache_connector: the peer server failed serving %s", peer)
        finally:
            self._release(sock)

    def _handshake(self, wire: Wire) -> None:
        deadline = time.monotonic() + self.limits.handshake_timeout_s
        nonce = auth.new_nonce()
        wire.send([hello_frame(nonce, auth_required=self.token is not None)], deadline)
        frame = wire.recv_frame(deadline, {FrameType.AUTH: NONCE_BYTES + PROOF_BYTES})
        client_nonce, proof = parse_auth(wire.recv_bytes(frame.length, deadline))
        server_proof = None
        if self.token is not None:
            if not auth.proof_matches(auth.client_proof(self.token, nonce, client_nonce), proof):
                self._count("refused_connections")
                wire.send([error_frame(ErrorCode.AUTH_REFUSED, "no or wrong LMCACHE_P2P_AUTH_TOKEN")], deadline)
                raise PeerError(f"{wire.peer} did not prove the token")
            server_proof = auth.server_proof(self.token, nonce, client_nonce)
        wire.send([welcome_frame(server_proof, self.limits.max_chunks_per_request)], deadline)

    def _next_request(self, wire: Wire) -> PeerRequest | None:
        """The next request, or ``None`` when the client closed the connection between requests."""
        head = bytearray(FRAME_BYTES)
        try:
            wire.recv_exact(memoryview(head)[:1], time.monotonic() + self.limits.idle_timeout_s)
        except PeerError:
            return None  # idle too long, or closed: the end of an ordinary connection
        deadline = time.monotonic() + self.limits.io_timeout_s
        wire.recv_exact(memoryview(head)[1:], deadline)
        frame = _check_request_frame(bytes(head), self._max_request, wire.peer)
        request = parse_request(wire.recv_bytes(frame.length, deadline), self.limits.max_chunks_per_request)
        if (request.namespace, request.tp_rank, request.pp_rank) != (self.namespace, self.tp_rank, self.pp_rank):
            message = (
                f"this server holds namespace {self.namespace_hex[:16]} rank {self.rank}, not "
                f"{request.namespace.hex()[:16]} rank {rank_tag(request.tp_rank, request.pp_rank)}"
            )
            wire.send([error_frame(ErrorCode.WRONG_NAMESPACE, message)], deadline)
            raise PeerError(message)
        return request

    def _answer(self, wire: Wire, request: PeerRequest, scratch: bytearray) -> bytearray:
        """Send every chunk of ``request``, FOUND or MISSING, in order; the (possibly grown) scratch."""

        def take(nbytes: int) -> memoryview:
            nonlocal scratch
            if len(scratch) < nbytes:
                scratch = bytearray(nbytes)
            return memoryview(scratch)[:nbytes]

        lend = getattr(self.source, "lend", None)
        for index, ask in enumerate(request.chunks):
            try:
                lent = lend(ask.key, ask.block_fps) if lend is not None else None
                if lent is not None:
                    self._send_lent(wire, ask, index, lent)
                    continue
                copy = self.source.read(ask.key, ask.block_fps, take)
            except PeerError:
                raise
            except Exception:  # a source bug is a miss for this chunk, not a dead connection
                logger.exception("lmcache_connector: reading chunk %s for a peer failed", ask.key.hex()[:12])
                copy = None
            deadline = time.monotonic() + self.limits.io_timeout_s
            if copy is None:
                self._send_missing(wire, index, deadline)
                continue
            header = self._header(ask, copy.shape)
            first, *rest = encode_value(header, [copy.data])
            length = len(first) + sum(len(piece) for piece in rest)
            wire.send([frame_header(FrameType.FOUND, length, tag=index) + first, *rest], deadline)
            self._count("peer_served_chunks")
            self._count("peer_served_bytes", header.nbytes)
        return scratch

    def _send_lent(self, wire: Wire, ask, index: int, lent: LentChunk) -> None:
        """A chunk straight from its memory slot: hashed in place, SENT, then CONFIRMED when the slot
        held those bytes throughout (else TORN: a miss for the client, whatever it received)."""
        header = self._header(ask, lent.shape)
        first, *rest = encode_value(header, lent.regions)  # the checksum, read from the slot
        deadline = time.monotonic() + self.limits.io_timeout_s
        if not lent.confirm():  # rewritten while hashed: nothing sent yet, a plain miss
            self._send_missing(wire, index, deadline)
            return
        length = len(first) + sum(len(piece) for piece in rest)
        wire.send([frame_header(FrameType.SENT, length, tag=index) + first, *rest], deadline)
        if lent.confirm():
            wire.send([frame_header(FrameType.CONFIRMED, 0, tag=index)], deadline)
            self._count("peer_served_chunks")
            self._count("peer_served_bytes", header.nbytes)
        else:
            wire.send([frame_header(FrameType.TORN, 0, tag=index)], deadline)
            self._count("peer_served_misses")

    def _send_missing(self, wire: Wire, index: int, deadline: float) -> None:
        self._count("peer_served_misses")
        wire.send([frame_header(FrameType.MISSING, 0, tag=index)], deadline)

    def _header(self, ask, shape) -> ValueHeader:
        return ValueHeader(self.namespace_hex, self.rank, ask.key.hex(), tuple(fp.hex() for fp in ask.block_fps), shape)

    def _count(self, key: str, amount: float = 1) -> None:
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + amount


def _check_request_frame(raw: bytes, bound: int, peer: str) -> Frame:
    frame = parse_frame_header(raw)
    if frame.type != FrameType.REQUEST:
        raise PeerProtocolError(f"{peer} sent {frame.type.name} where a REQUEST belongs")
    if frame.length > bound:
        raise PeerProtocolError(f"{peer} sent a request of {frame.length} bytes; at most {bound} are allowed")
    return frame


def _name(where) -> str:
    host, port = where[0], where[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
