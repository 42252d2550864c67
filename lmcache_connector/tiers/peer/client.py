"""Fetching chunks from peers into the caller's buffers, and skipping peers that went bad.

:class:`PeerClient` (one per worker rank; thread-safe) fetches chunks of its own namespace and rank
from a peer's server (:mod:`.server`) over :mod:`.protocol`:

* ``fetch(address, wants, timeout_s)`` sends the wanted chunks' fingerprints and reads each answer
  straight into the caller's buffers (a memory slot in phase 2): the value's header is checked
  against what was asked (namespace, rank, key, block fingerprints, shape) before any of its bytes
  are read, and its xxh3 checksum is computed as they land (:func:`~..remote.value.receive_value`);
  a value the server SENT straight from its memory slot counts only once the server CONFIRMED it
  (TORN: the slot was rewritten during the send, a miss);
* it never raises for a peer's failure: the :class:`FetchResult` says which chunks arrived whole
  and verified, and ``error`` why the rest did not (:class:`~.protocol.PeerError`: unreachable,
  timed out, closed mid-transfer, garbage, a corrupt chunk, refused). The whole fetch, connecting
  and the handshake included, ends by the deadline;
* connections are reused (a few idle ones per peer, checked before reuse); one that failed in any
  way is closed, never read again.

:class:`PeerHealth` remembers which peers failed lately, so a caller skips them for a while (1 s,
doubling per consecutive failure up to 60 s) and logs one warning when a peer goes bad, not one
per request. :func:`fetch_from_holders` ties the two: it tries every live holder in turn, within
one deadline, for the chunks still missing.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from lmcache_connector.keys import rank_tag
from lmcache_connector.tiers.peer import auth
from lmcache_connector.tiers.peer.addresses import PeerAddress
from lmcache_connector.tiers.peer.protocol import (
    DEFAULT_MAX_VALUE_BYTES,
    FLAG_AUTH_REQUIRED,
    NONCE_BYTES,
    ChunkAsk,
    FrameType,
    PeerAuthError,
    PeerError,
    PeerProtocolError,
    PeerRequest,
    PeerUnavailableError,
    Wire,
    auth_frame,
    parse_welcome,
    request_frame,
)
from lmcache_connector.tiers.remote.value import (
    MAX_HEADER_BYTES,
    PREFIX_BYTES,
    ChecksumMismatchError,
    RemoteValueError,
    ValueHeader,
    receive_value,
)

logger = logging.getLogger("lmcache_connector")

MAX_IDLE_PER_PEER = 4
IDLE_REUSE_S = 20.0  # an idle connection older than this is closed, not reused (servers close at 60 s)
_WELCOME_BYTES = 36


@dataclass(frozen=True)
class ChunkWant:
    """One chunk to fetch: its block fingerprints (the last is its key), its shape on this rank
    (``(regions, blocks, row bytes)``) and the buffers its bytes go to, in order."""

    block_fps: tuple[bytes, ...]
    shape: tuple[int, int, int]
    regions: Sequence[memoryview]

    @property
    def key(self) -> bytes:
        return self.block_fps[-1]

    @property
    def nbytes(self) -> int:
        regions, blocks, row = self.shape
        return regions * blocks * row


@dataclass
class FetchResult:
    """``found[i]``: the i-th chunk's buffers hold its verified bytes. Any other buffer may hold
    part of a value and must not be used. ``error``: why the fetch ended early (None: every chunk
    was answered, found or missing)."""

    found: list[bool]
    error: PeerError | None = None
    answered: int = 0  # chunks the peer answered, found or missing
    nbytes: int = 0
    seconds: float = 0.0


class PeerClient:
    def __init__(
        self,
        namespace_hex: str,
        tp_rank: int,
        pp_rank: int = 0,
        token: bytes | None = None,
        connect_timeout_s: float = 2.0,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
    ):
        self.namespace_hex = namespace_hex
        self.namespace = bytes.fromhex(namespace_hex)
        self.tp_rank, self.pp_rank = tp_rank, pp_rank
        self.rank = rank_tag(tp_rank, pp_rank)
        self.token = token
        self.connect_timeout_s = connect_timeout_s
        self.max_value_bytes = max_value_bytes
        self._idle: dict[PeerAddress, list[_Connection]] = {}
        self._lock = threading.Lock()
        self._request_id = 0

    def fetch(self, address: PeerAddress, wants: Sequence[ChunkWant], timeout_s: float) -> FetchResult:
        """Fetch ``wants`` from the peer server at ``address`` (the worker of this rank) by ``timeout_s``."""
        for want in wants:
            room = sum(memoryview(region).nbytes for region in want.regions)
            if room != want.nbytes or len(want.shape) != 3 or want.shape[1] != len(want.block_fps):
                raise ValueError(f"chunk {want.key.hex()[:12]}: buffers of {room} bytes for shape {want.shape}")
        started = time.monotonic()
        deadline = started + timeout_s
        result = FetchResult([False] * len(wants))
        if not wants:
            return result
        connection = self._take(address)
        reused = connection is not None
        try:
            if connection is None:
                connection = self._connect(address, deadline)
            try:
                self._exchange_all(connection, wants, result, deadline)
            except PeerUnavailableError:
                if not reused or result.answered:
                    raise
                # The peer closed the idle connection just as we took it: once more on a fresh one.
                connection.wire.close()
                connection = None
                connection = self._connect(address, deadline)
                self._exchange_all(connection, wants, result, deadline)
        except PeerError as exc:
            result.error = exc
        finally:
            if connection is not None:
                if result.error is None:
                    self._give_back(address, connection)
                else:
                    connection.wire.close()
        result.seconds = time.monotonic() - started
        return result

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.wire.close()

    # ------------------------------------------------------------ pieces

    def _exchange_all(
        self, connection: _Connection, wants: Sequence[ChunkWant], result: FetchResult, deadline: float
    ) -> None:
        done = 0
        while done < len(wants):
            batch = wants[done : done + connection.max_chunks]
            self._exchange(connection, batch, done, result, deadline)
            done += len(batch)

    def _exchange(
        self, connection: _Connection, batch: Sequence[ChunkWant], first: int, result: FetchResult, deadline: float
    ) -> None:
        wire = connection.wire
        with self._lock:
            self._request_id = (self._request_id + 1) & 0xFFFFFFFF
            request_id = self._request_id
        request = PeerRequest(
            self.namespace, self.tp_rank, self.pp_rank, tuple(ChunkAsk(tuple(w.block_fps)) for w in batch)
        )
        wire.send([request_frame(request, request_id)], deadline)
        for index, want in enumerate(batch):
            bound = min(self.max_value_bytes, PREFIX_BYTES + MAX_HEADER_BYTES + want.nbytes)
            frame = wire.recv_frame(deadline, {FrameType.FOUND: bound, FrameType.SENT: bound, FrameType.MISSING: 0})
            if frame.tag != index:
                raise PeerProtocolError(f"{wire.peer} answered chunk {frame.tag} where chunk {index} belongs")
            if frame.type == FrameType.MISSING:
                result.answered += 1
                continue
            expect = ValueHeader(
                self.namespace_hex, self.rank, want.key.hex(), tuple(fp.hex() for fp in want.block_fps), want.shape
            )
            bad: RemoteValueError | None = None
            try:
                receive_value(frame.length, lambda view: wire.recv_exact(view, deadline), expect, want.regions)
            except ChecksumMismatchError as exc:  # every byte read: a SENT value's trailer still follows
                bad = exc
            except RemoteValueError as exc:
                raise PeerProtocolError(f"{wire.peer} sent a bad chunk {want.key.hex()[:12]}: {exc}") from None
            if frame.type == FrameType.SENT:
                trailer = wire.recv_frame(deadline, {FrameType.CONFIRMED: 0, FrameType.TORN: 0})
                if trailer.tag != index:
                    raise PeerProtocolError(f"{wire.peer} confirmed chunk {trailer.tag} where chunk {index} belongs")
                if trailer.type == FrameType.TORN:  # rewritten while sent: a miss, whatever arrived
                    result.answered += 1
                    continue
            if bad is not None:
                raise PeerProtocolError(f"{wire.peer} sent a bad chunk {want.key.hex()[:12]}: {bad}")
            result.answered += 1
            result.found[first + index] = True
            result.nbytes += want.nbytes

    def _connect(self, address: PeerAddress, deadline: float) -> _Connection:
        timeout = min(self.connect_timeout_s, max(deadline - time.monotonic(), 0.001))
        try:
            sock = socket.create_connection((address.host, address.port), timeout=timeout)
        except TimeoutError:
            raise PeerUnavailableError(f"peer {address} did not accept a connection in time") from None
        except OSError as exc:
            raise PeerUnavailableError(f"peer {address}: {exc.strerror or exc}") from None
        wire = Wire(sock, f"peer {address}")
        try:
            return _Connection(wire, self._handshake(wire, deadline))
        except PeerError:
            wire.close()
            raise

    def _handshake(self, wire: Wire, deadline: float) -> int:
        """Prove the token (when we hold one) and check the peer's proof; the peer's max chunks per request."""
        hello = wire.recv_frame(deadline, {FrameType.HELLO: NONCE_BYTES})
        if hello.length != NONCE_BYTES:
            raise PeerProtocolError(f"{wire.peer} sent a HELLO of {hello.length} bytes")
        server_nonce = wire.recv_bytes(NONCE_BYTES, deadline)
        if hello.flags & FLAG_AUTH_REQUIRED and self.token is None:
            raise PeerAuthError(f"{wire.peer} requires LMCACHE_P2P_AUTH_TOKEN, which this instance does not have")
        client_nonce = auth.new_nonce()
        proof = auth.client_proof(self.token, server_nonce, client_nonce) if self.token is not None else None
        wire.send([auth_frame(client_nonce, proof)], deadline)
        welcome = wire.recv_frame(deadline, {FrameType.WELCOME: _WELCOME_BYTES})
        if welcome.length != _WELCOME_BYTES:
            raise PeerProtocolError(f"{wire.peer} sent a WELCOME of {welcome.length} bytes")
        server_proof, max_chunks = parse_welcome(wire.recv_bytes(_WELCOME_BYTES, deadline))
        if self.token is not None:
            expected = auth.server_proof(self.token, server_nonce, client_nonce)
            if not auth.proof_matches(expected, server_proof):
                raise PeerAuthError(f"{wire.peer} could not prove it knows LMCACHE_P2P_AUTH_TOKEN")
        return max_chunks

    def _take(self, address: PeerAddress) -> _Connection | None:
        """An idle connection to ``address`` that is still good, or None."""
        while True:
            with self._lock:
                idle = self._idle.get(address)
                if not idle:
                    return None
                connection = idle.pop()
            if time.monotonic() - connection.idle_since < IDLE_REUSE_S and _quiet(connection.wire.sock):
                return connection
            connection.wire.close()  # closed by the server, or sent something unasked: out of step

    def _give_back(self, address: PeerAddress, connection: _Connection) -> None:
        connection.idle_since = time.monotonic()
        with self._lock:
            idle = self._idle.setdefault(address, [])
            if len(idle) < MAX_IDLE_PER_PEER:
                idle.append(connection)
                return
        connection.wire.close()


@dataclass
class _Connection:
    wire: Wire
    max_chunks: int
    idle_since: float = field(default_factory=time.monotonic)


def _quiet(sock: socket.socket) -> bool:
    """Whether an idle connection has nothing to read: no close, no stray bytes."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


# ---------------------------------------------------------------- peers that went bad


BAD_FIRST_S = 1.0
BAD_MAX_S = 60.0


@dataclass
class _Bad:
    until: float
    wait: float
    failures: int = 1


class PeerHealth:
    """Which peers failed lately: skipped until their back-off ends (1 s, doubling per consecutive
    failure, up to 60 s). One warning when a peer goes bad, one info line when it serves again."""

    def __init__(self, first_s: float = BAD_FIRST_S, max_s: float = BAD_MAX_S):
        self.first_s, self.max_s = first_s, max_s
        self._bad: dict[str, _Bad] = {}
        self._lock = threading.Lock()
        self._counts: dict[str, float] = {}
        self._news: dict[str, float] = {}  # peers whose skip window just started -> its seconds

    def usable(self, peer: object) -> bool:
        with self._lock:
            bad = self._bad.get(str(peer))
            return bad is None or time.monotonic() >= bad.until

    def failed(self, peer: object, error: Exception) -> None:
        name = str(peer)
        with self._lock:
            self._counts["peer_failures"] = self._counts.get("peer_failures", 0) + 1
            bad = self._bad.get(name)
            if bad is not None:
                bad.wait = min(bad.wait * 2, self.max_s)
                bad.until = time.monotonic() + bad.wait
                bad.failures += 1
                self._news[name] = bad.wait
                return
            self._bad[name] = _Bad(time.monotonic() + self.first_s, self.first_s)
            self._news[name] = self.first_s
        logger.warning(
            "lmcache_connector: peer %s failed (%s); skipping it for a while (those chunks are recomputed "
            "or fetched from another holder)",
            name,
            error,
        )

    def succeeded(self, peer: object) -> None:
        name = str(peer)
        with self._lock:
            if name not in self._bad:
                return
            del self._bad[name]
        logger.info("lmcache_connector: peer %s serves again", name)

    def bad_peers(self) -> list[str]:
        with self._lock:
            return sorted(self._bad)

    def take_counts(self) -> dict[str, float]:
        with self._lock:
            counts, self._counts = self._counts, {}
        return counts

    def take_news(self) -> dict[str, float]:
        """Peers whose skip window started since the last call, and its length in seconds."""
        with self._lock:
            news, self._news = self._news, {}
        return news


def fetch_from_holders(
    client: PeerClient,
    health: PeerHealth,
    holders: Sequence[PeerAddress],
    wants: Sequence[ChunkWant],
    timeout_s: float,
) -> list[bool]:
    """Fetch ``wants`` from the first usable holder, then the chunks still missing from the next,
    all within ``timeout_s``; which chunks arrived. A holder that fails is marked in ``health``."""
    deadline = time.monotonic() + timeout_s
    found = [False] * len(wants)
    for holder in holders:
        left = deadline - time.monotonic()
        if all(found) or left <= 0:
            break
        if not health.usable(holder):
            continue
        missing = [i for i, ok in enumerate(found) if not ok]
        result = client.fetch(holder, [wants[i] for i in missing], left)
        for i, ok in zip(missing, result.found, strict=True):
            found[i] = ok
        if result.error is None:
            health.succeeded(holder)
        else:
            health.failed(holder, result.error)
    return found
