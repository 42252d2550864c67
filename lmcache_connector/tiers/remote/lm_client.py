"""A client for LMCache's cache server (``lmcache_server``, ``lm://HOST:PORT``) behind the remote-tier contract.

Teams that already run LMCache's cache server (the vLLM production-stack chart deploys it as its
"cache server") can point this connector at it. :func:`connect_lm` builds an
:class:`LMServerClient`, a :class:`~.client.RemoteClient` that speaks the server's framing, written
from the protocol's description (LMCache 0.5.6):

  request    186 bytes: nine int32 (command, payload length, memory format, dtype code, location,
             four shape dimensions), then the key, UTF-8, right-padded with spaces to 150 bytes
  response   36 bytes: nine int32 (code 200/400, length, format, dtype, four shape dimensions,
             location); a GET's 200 is followed by ``length`` bytes
  PUT        header then payload; the server sends no reply
  GET        a 200 header and the bytes, or a 400 header with length 0
  EXIST      a 200 or 400 header;  HEALTH  a 200 header (the key is parsed even then);
  LIST       never answered: never sent

Integers are 32-bit little-endian (the server packs them in its native order, which is
little-endian on the x86-64 and aarch64 machines it runs on). The server parses every key with
LMCache's key grammar and closes the connection on one it cannot parse, so this client only ever
sends keys in that grammar (:func:`lm_key`).

Key mapping (deterministic and injective; LMCache's own chunks are never read or shared: their
hashes come from CPython's ``hash`` and mean nothing here). A tier key is
``<head>-tp<R>pp<P>-<32 hex digits>``, where ``<head>`` is the key prefix, the block-entry mark
``b:`` for block entries, and the namespace digest (:func:`~.client.value_key`,
:func:`~.client.side_key`). It becomes ``model@world_size@worker_id@chunk_hash_hex@dtype`` with

  model           ``<head>`` with ``%``, ``@`` and anything outside printable ASCII percent-escaped
                  (so values and block entries, namespaces and prefixes stay apart)
  world_size      the pipeline-parallel rank ``P`` (LMCache's key has no field of its own for it;
                  the server only compares keys for equality)
  worker_id       the tensor-parallel rank ``R``
  chunk_hash_hex  the chunk key or block fingerprint, always 32 digits (the server compares the
                  number, so a fixed width keeps leading zeros meaningful)
  dtype           ``uint8``: values and block entries alike are opaque bytes to the server

e.g. ``lmc:0123456789abcdef-tp1pp0-<fp>`` -> ``lmc:0123456789abcdef@0@1@<fp>@uint8`` and the block
entry ``lmc:b:0123456789abcdef-tp0pp0-<fp>`` -> ``lmc:b:0123456789abcdef@0@0@<fp>@uint8``. Every
PUT says format 1 (KV_2LTD), dtype code 6 (uint8) and shape ``[length, 0, 0, 0]``.

Promises:

* every call returns or raises :class:`~.client.RemoteUnavailableError` within the socket timeout
  (one deadline for the whole call: reading answers owed to earlier puts, connecting, sending and
  every read);
* a connection is used by one request at a time (a small pool; a thread takes one for a whole
  request, header and body), reads are exact-length, and a connection that timed out, was cut
  short, or answered anything unexpected is closed, never reused: a later reply can never be
  read as the answer to another request. An idle pooled connection is checked before reuse (a
  restarted server closed it); a call that finds the server gone reconnects, with a short
  back-off after a failed connect;
* ``get_into`` reads a value straight into the caller's buffers (the chunk's memory slot), its
  header checked before any of the chunk's bytes are read and its checksum computed as they land:
  no buffer of the whole value is allocated and nothing is copied twice (a fresh 4 MiB buffer
  costs its page faults on every read);
* ``put`` ends with a HEALTH on the same connection: the server handles one connection's requests
  in order, so its answer means the PUTs before it were stored. The answer is read before this
  client's next request (or at :meth:`~LMServerClient.close`), not by ``put`` itself: a writer
  prepares its next chunk meanwhile, and reads of this client always see its own writes. Another
  process may look a moment before the server has taken the last write; a write lost with its
  connection is a future miss.

What the server cannot do, and this client therefore does not pretend to: it has no delete
(``delete_many`` and ``delete_matching`` remove nothing and return 0), no TTL (``expire_many`` does
nothing), no memory report (``memory`` is ``(0, 0)``), and no eviction or bound: it keeps every
value in memory until it is restarted (and is OOM-killed under a long trace). Redis, with
``maxmemory`` and an LRU policy, is the recommended store; ``lm://`` is for existing deployments.
"""

from __future__ import annotations

import logging
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from lmcache_connector.tiers.remote.client import (  # noqa: F401 (the contract's errors and keys, re-exported)
    PutItem,
    RemoteError,
    RemoteUnavailableError,
    put_each,
    side_key,
    value_key,
)
from lmcache_connector.tiers.remote.value import ValueHeader, receive_value
from lmcache_connector.urls import RemoteUrl

if TYPE_CHECKING:
    from lmcache_connector.config import LMCacheConfig

logger = logging.getLogger("lmcache_connector")

_T = TypeVar("_T")
PIPELINE = 64  # requests sent before their answers are read (exists_many, resolve_side_keys)
READ_AHEAD = 64 * 1024  # a connection's read-ahead buffer (_Connection)

# Commands, codes and header fields of the server's protocol.
PUT, GET, EXIST, LIST, HEALTH = 1, 2, 3, 4, 5  # LIST is never sent: the server never answers it
OK, FAIL = 200, 400
FORMAT_KV_2LTD = 1  # the one format every server version knows; the server only stores it
DTYPE_UINT8 = 6
KEY_BYTES = 150
_REQUEST = struct.Struct(f"<9i{KEY_BYTES}s")  # command, length, format, dtype, location, shape x4, key
_RESPONSE = struct.Struct("<9i")  # code, length, format, dtype, shape x4, location
MAX_LENGTH = (1 << 31) - 1  # the length field is an int32

HEALTH_KEY = "lmcache_connector.health@0@0@0@uint8"  # HEALTH still parses a key: a valid, unused one
KEY_DTYPE = "uint8"
MAX_IDLE_CONNECTIONS = 8
RECONNECT_FIRST_S = 0.05  # after a failed connect, calls fail at once for this long, doubling...
RECONNECT_MAX_S = 1.0  # ...up to this: the tier's own probing backs off further

_TIER_KEY = re.compile(r"(?P<head>.+)-tp(?P<tp>0|[1-9][0-9]{0,5})pp(?P<pp>0|[1-9][0-9]{0,5})-(?P<hex>[0-9a-f]{32})")
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only
_SAFE = frozenset(chr(c) for c in range(33, 127)) - {"%", "@"}


_warned_ttl = False


class ProtocolError(Exception):
    """The server answered something this protocol does not allow: the connection is out of step."""


def lm_key(tier_key: str) -> str:
    """The server key for one tier key (see the module's key mapping). Raises ``ValueError`` for a
    key that is not a tier key or whose mapping exceeds the server's 150 bytes."""
    match = _TIER_KEY.fullmatch(tier_key)
    if match is None:
        raise ValueError(f"{tier_key!r} is not a remote-tier key (<prefix><namespace16>-tp<R>pp<P>-<32 hex>)")
    model = "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in match["head"])
    key = f"{model}@{match['pp']}@{match['tp']}@{match['hex']}@{KEY_DTYPE}"
    if len(key.encode()) > KEY_BYTES:
        raise ValueError(f"{tier_key!r} maps to {len(key.encode())} bytes; lmcache_server allows {KEY_BYTES}")
    return key


def _request(command: int, key: str, length: int = 0) -> bytes:
    shape0 = length if command == PUT else 0
    return _REQUEST.pack(
        command, length, FORMAT_KV_2LTD, DTYPE_UINT8, 0, shape0, 0, 0, 0, key.encode().ljust(KEY_BYTES)
    )


@dataclass(frozen=True)
class LMOptions:
    """Everything but the URL."""

    key_prefix: str = "lmc:"
    socket_timeout_secs: float = 5.0  # bounds a whole call
    connect_timeout_secs: float = 2.0

    @classmethod
    def from_config(cls, config: LMCacheConfig, socket_timeout_secs: float | None = None) -> LMOptions:
        timeout = config.blocking_timeout_secs if socket_timeout_secs is None else socket_timeout_secs
        return cls(
            key_prefix=config.remote_key_prefix,
            socket_timeout_secs=timeout,
            connect_timeout_secs=min(timeout, 2.0),
        )


def connect_lm(url: RemoteUrl, config: LMCacheConfig, socket_timeout_secs: float | None = None) -> LMServerClient:
    """A client for ``url`` with the ``LMCACHE_REMOTE_*`` settings; ``socket_timeout_secs`` overrides
    ``LMCACHE_BLOCKING_TIMEOUT_SECS``. Connects lazily: call :meth:`LMServerClient.ping` to check."""
    global _warned_ttl
    if config.remote_ttl_secs and not _warned_ttl:
        _warned_ttl = True  # once per process, not once per client (the catalog and every worker build one)
        logger.warning(
            "LMCACHE_REMOTE_TTL_SECS=%s is ignored for %s: lmcache_server keeps every value until it restarts",
            config.remote_ttl_secs,
            url,
        )
    return LMServerClient(url, LMOptions.from_config(config, socket_timeout_secs))


class _Connection:
    """One socket and the deadline of the request using it. Every failure closes it for good.

    Reads go through a small read-ahead buffer: a pipelined batch's answers (36-byte headers, small
    entries) arrive together and are taken from one ``recv`` instead of one each, so a thread that
    must win the GIL back after every ``recv`` (an engine's other threads keep it busy) does so a
    few times a batch, not once an answer. Large reads (a value's bytes) go straight into the
    caller's buffer."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.received = 0  # bytes read from the socket by the current request
        self.owed = 0  # HEALTH answers owed to earlier puts (read before the next request)
        self._ahead = bytearray(READ_AHEAD)
        self._start = self._end = 0  # the read-ahead bytes not handed out yet

    def send(self, data: bytes | memoryview, deadline: float) -> None:
        self.sock.settimeout(_left(deadline))
        self.sock.sendall(data)  # the timeout bounds the whole sendall, not each piece

    def recv_into(self, view: memoryview, deadline: float) -> None:
        """Fill ``view`` exactly; a closed stream is a :class:`ConnectionError`."""
        got = min(len(view), self._end - self._start)
        if got:
            view[:got] = self._ahead[self._start : self._start + got]
            self._start += got
        while got < len(view):
            need = len(view) - got
            if need >= READ_AHEAD:  # a value's bytes: straight into the caller's buffer
                got += self._recv(view[got:], deadline, got, len(view))
                continue
            n = self._recv(memoryview(self._ahead), deadline, got, len(view))
            take = min(n, need)
            view[got : got + take] = self._ahead[:take]
            self._start, self._end = take, n
            got += take

    def _recv(self, into: memoryview, deadline: float, got: int, wanted: int) -> int:
        self.sock.settimeout(_left(deadline))
        if _QUICKACK is not None:
            # The server does not set TCP_NODELAY and sends a GET's header and body in two
            # writes: Nagle holds the body until the header is acknowledged, and a delayed ACK
            # (40 ms) would stall every small GET. The kernel drops quick-ACK mode by itself,
            # so it is asked for before every read (measured: 45 ms -> 1 ms per block entry).
            self.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        n = self.sock.recv_into(into)
        if n == 0:
            raise ConnectionError(f"the server closed the connection after {got} of {wanted} bytes")
        self.received += n
        return n

    def response(self, deadline: float) -> tuple[int, int]:
        """``(code, length)`` of the next response header, checked."""
        raw = bytearray(_RESPONSE.size)
        self.recv_into(memoryview(raw), deadline)
        code, length, *_ = _RESPONSE.unpack(raw)
        if code not in (OK, FAIL) or length < 0 or (code == FAIL and length):
            raise ProtocolError(f"unexpected response header (code {code}, length {length})")
        return code, length

    def body(self, length: int, deadline: float) -> bytearray:
        data = bytearray(length)
        self.recv_into(memoryview(data), deadline)
        return data

    def idle_is_usable(self) -> bool:
        """Whether a pooled connection can carry a request: nothing to read on an idle connection
        (a readable one is either closed by the server, e.g. restarted, or out of step)."""
        if self._end > self._start:
            return False  # bytes read ahead that no request asked for: out of step
        poller = select.poll()
        poller.register(self.sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        return not poller.poll(0)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _byte_view(piece: bytes | memoryview) -> memoryview:
    view = memoryview(piece)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


class LMServerClient:
    """One process's connections to an ``lmcache_server``: a :class:`~.client.RemoteClient`,
    thread-safe (a pool of connections, one request at a time on each)."""

    failures_are_partial = False  # one server: a failure is the whole store's
    # One entry a chunk: each is a request, read back one round trip at a time, and held forever in
    # a server without a memory bound.
    entry_every_block = False
    # put() takes a value as its pieces (the header, then the memory slot's regions), sent one after
    # another: no copy of the chunk into one buffer first.
    takes_value_pieces = True

    def __init__(self, url: RemoteUrl, options: LMOptions):
        if url.kind != "lm":
            raise ValueError(f"{url} is not an lm:// URL")
        self.url = url
        self.options = options
        self.key_prefix = options.key_prefix
        (self._host, self._port), *_ = url.hosts
        # Fail at start, not on the first write, when the prefix leaves no room in 150 bytes.
        try:
            lm_key(side_key(options.key_prefix, "0" * 16, "tp9999pp9999", "0" * 32))
        except ValueError:
            raise ValueError(
                f"LMCACHE_REMOTE_KEY_PREFIX={options.key_prefix!r} is too long for lmcache_server's "
                f"{KEY_BYTES}-byte keys"
            ) from None
        self._lock = threading.Lock()  # the idle pool and the reconnect back-off
        self._idle: list[_Connection] = []
        self._owing: list[_Connection] = []  # connections with puts not yet confirmed
        self._retry_at = 0.0  # monotonic time before which no new connection is tried
        self._backoff = RECONNECT_FIRST_S
        self._closed = False
        self._warned_no_delete = False

    def __repr__(self) -> str:
        return f"LMServerClient({self.url})"

    # ------------------------------------------------------------ operations

    def ping(self) -> None:
        """Raise unless the server answers HEALTH."""

        def health(conn: _Connection, deadline: float) -> None:
            conn.send(_request(HEALTH, HEALTH_KEY), deadline)
            self._expect_ok(conn, deadline)

        self._call("HEALTH", health)

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key exists: the EXISTs pipelined on one connection held for the batch
        (:data:`PIPELINE` requests sent, then their answers read in order)."""

        def answer(conn: _Connection, deadline: float) -> bool:
            code, length = conn.response(deadline)
            if length:
                raise ProtocolError(f"an EXIST answer with a {length}-byte body")
            return code == OK

        return self._pipelined("EXIST", [_request(EXIST, lm_key(key)) for key in keys], answer)

    def _pipelined(self, command: str, frames: list[bytes], answer: Callable[[_Connection, float], _T]) -> list[_T]:
        """Send ``frames`` :data:`PIPELINE` at a time and read each batch's answers in order.

        One round trip a batch instead of one a request: a lookup of a long prompt asks dozens of
        keys, and in an engine process whose other threads keep the GIL busy each round trip costs
        a GIL hand-over (measured: 5-12 ms each; 48 one after another took 100-400 ms, past the
        lookup deadline). A batch's requests (186 bytes each) fit in the socket buffers, so the
        server never waits on us while we wait on it."""
        if not frames:
            return []

        def run(conn: _Connection, deadline: float) -> list[_T]:
            found: list[_T] = []
            for start in range(0, len(frames), PIPELINE):
                batch = frames[start : start + PIPELINE]
                conn.send(b"".join(batch), deadline)
                found.extend(answer(conn, deadline) for _ in batch)
            return found

        return self._call(command, run)

    def put(
        self,
        key: str,
        value: bytes | memoryview | Sequence[bytes | memoryview],
        side_keys: Sequence[str] = (),
        ttl: int | None = None,
        side_value: str | None = None,
    ) -> None:
        """Write the value (one buffer, or its pieces in order: ``takes_value_pieces``), then the
        block entries (each holding ``side_value``, by default the value's key), then a HEALTH whose
        answer confirms them; ``ttl`` is ignored (the server keeps everything).

        Returns once everything is sent; the answer is read by the next call of this client (any
        thread) before it sends anything, or by :meth:`close`. So a writer encodes its next chunk
        while the server is still taking this one (benchmarks/README.md: about 0.1x more of the raw
        socket's store throughput than waiting for each answer), and every later read of this
        client still sees the write. A write lost with its connection is a future miss."""
        pieces = [_byte_view(piece) for piece in (value if isinstance(value, (list, tuple)) else [value])]
        length = sum(len(piece) for piece in pieces)
        if length > MAX_LENGTH:
            raise ValueError(f"a {length}-byte value does not fit lmcache_server's int32 length")
        entry = (key if side_value is None else side_value).encode()
        header = _request(PUT, lm_key(key), length)
        # The entries and the closing HEALTH go in one send: small frames, no reply in between.
        tail = b"".join(_request(PUT, lm_key(side), len(entry)) + entry for side in side_keys)
        tail += _request(HEALTH, HEALTH_KEY)

        def store(conn: _Connection, deadline: float) -> None:
            conn.send(header, deadline)
            for piece in pieces:
                conn.send(piece, deadline)
            conn.send(tail, deadline)
            conn.owed += 1

        self._call("PUT", store)

    def put_many(self, items: Sequence[PutItem], ttl: int | None = None) -> None:
        put_each(self, items, ttl)  # one object (one request) per value: nothing to batch

    def get(self, key: str) -> bytes | None:
        """The value, or ``None`` when the server has none (never written, or the server restarted).
        The bytes come as a ``bytearray`` (read straight into it, not copied again)."""
        frame = _request(GET, lm_key(key))

        def fetch(conn: _Connection, deadline: float) -> bytearray | None:
            conn.send(frame, deadline)
            code, length = conn.response(deadline)
            return conn.body(length, deadline) if code == OK else None

        return self._call("GET", fetch)  # type: ignore[return-value]  # bytearray: bytes-like

    def get_into(self, key: str, expect: ValueHeader, regions: Sequence[memoryview]) -> bool:
        """Read the value straight into ``regions`` (:func:`~.value.receive_value`: the header
        checked first, the bytes hashed as they land); ``False`` when the server has none. A value
        that is not ``expect``'s chunk raises its :class:`~.value.RemoteValueError` and the
        connection is dropped (the rest of the value is never read), so nothing is misframed."""
        frame = _request(GET, lm_key(key))

        def fetch(conn: _Connection, deadline: float) -> bool:
            conn.send(frame, deadline)
            code, length = conn.response(deadline)
            if code != OK:
                return False
            receive_value(length, lambda view: conn.recv_into(view, deadline), expect, regions)
            return True

        return self._call("GET", fetch)

    def resolve_side_keys(self, keys: Sequence[str]) -> list[str | None]:
        """What each block entry holds, or ``None`` where there is none (or it is not text): the
        GETs pipelined as :meth:`exists_many`'s EXISTs."""

        def answer(conn: _Connection, deadline: float) -> str | None:
            code, length = conn.response(deadline)
            return _text(conn.body(length, deadline) if code == OK else None)

        return self._pipelined("GET", [_request(GET, lm_key(key)) for key in keys], answer)

    def expire_many(self, keys: Sequence[str], ttl: int) -> list[bool]:
        """Nothing to refresh: values on this server never expire. ``True`` for every key, unasked."""
        return [True] * len(keys)

    def delete_many(self, keys: Sequence[str]) -> int:
        """The server has no delete: nothing is removed; 0."""
        self._warn_no_delete()
        return 0

    def delete_matching(self, pattern: str) -> int:
        """The server has no delete (nor a listing): a reset removes nothing here; 0."""
        self._warn_no_delete()
        return 0

    def memory(self) -> tuple[int, int]:
        """The server reports no memory use: ``(0, 0)``."""
        return 0, 0

    def close(self) -> None:
        # Read what the server owes the last puts first: a socket closed with unread data is reset,
        # and the server could drop writes it had not read yet.
        self._settle(time.monotonic() + min(self.options.socket_timeout_secs, 5.0))
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # ------------------------------------------------------------ pieces

    def _call(self, command: str, work: Callable[[_Connection, float], _T]) -> _T:
        """Run ``work`` on a connection of its own within one deadline. A failure closes the
        connection and raises :class:`RemoteUnavailableError`; a pooled connection the server
        closed while idle (``ConnectionError`` before any answer) is replaced once."""
        deadline = time.monotonic() + self.options.socket_timeout_secs
        self._settle(deadline)
        for attempt in range(2):
            conn, reused = self._take(command, deadline)
            try:
                result = work(conn, deadline)
            except (OSError, ProtocolError) as exc:  # socket errors and timeouts are OSErrors
                conn.close()
                # The server closed a pooled connection between our check and this request: replace
                # it once. Never after an answer began, nor after a timeout (that would double the wait).
                stale = reused and attempt == 0 and isinstance(exc, ConnectionError) and conn.received == 0
                if stale and time.monotonic() < deadline:
                    continue
                reason = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
                raise RemoteUnavailableError(f"{command} on {self.url} failed: {reason}") from None
            except BaseException:
                conn.close()  # interrupted mid-request: the stream's position is unknown
                raise
            self._give_back(conn)
            return result
        raise AssertionError("unreachable")

    def _take(self, command: str, deadline: float) -> tuple[_Connection, bool]:
        """A connection for one request: an idle one that is still usable, or a new one."""
        while True:
            with self._lock:
                if self._closed:
                    raise RemoteUnavailableError(f"{command} on {self.url}: the client is closed")
                conn = self._idle.pop() if self._idle else None
                retry_in = self._retry_at - time.monotonic()
            if conn is None:
                break
            if conn.idle_is_usable():
                conn.received = 0
                return conn, True
            conn.close()  # the server closed it (restarted) or it holds stray bytes
        if retry_in > 0:
            raise RemoteUnavailableError(
                f"{command} on {self.url}: not reconnecting for another {retry_in * 1000:.0f} ms after a failed connect"
            )
        left = deadline - time.monotonic()
        if left <= 0:  # spent on earlier puts' answers: this call's failure, not the connect's
            raise RemoteUnavailableError(f"{command} on {self.url} failed: timed out")
        try:
            sock = socket.create_connection(
                (self._host, self._port), timeout=min(self.options.connect_timeout_secs, left)
            )
        except OSError as exc:
            with self._lock:
                self._retry_at = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2, RECONNECT_MAX_S)
            reason = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            raise RemoteUnavailableError(f"{command} on {self.url}: cannot connect ({reason})") from None
        # Small frames (headers, EXIST batches) must leave at once, not wait for an ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._backoff = RECONNECT_FIRST_S
            self._retry_at = 0.0
        return _Connection(sock), False

    def _give_back(self, conn: _Connection) -> None:
        with self._lock:
            if conn.owed and not self._closed:
                self._owing.append(conn)  # settled by the next call, whatever the pool's size
                return
            if not self._closed and len(self._idle) < MAX_IDLE_CONNECTIONS:
                self._idle.append(conn)
                return
        conn.close()

    def _settle(self, deadline: float) -> None:
        """Read the answers owed to earlier puts, so that what they wrote is stored before this
        call's request is sent. A connection whose answer does not come in time or is wrong is
        closed (its writes may be lost: future misses); this call goes on with another."""
        with self._lock:
            owing, self._owing = self._owing, []
        for conn in owing:
            try:
                while conn.owed:
                    self._expect_ok(conn, deadline)
                    conn.owed -= 1
            except (OSError, ProtocolError) as exc:
                conn.close()
                logger.debug("an earlier write to %s was not confirmed (%s): it may be lost", self.url, exc)
                continue
            self._give_back(conn)

    @staticmethod
    def _expect_ok(conn: _Connection, deadline: float) -> None:
        code, length = conn.response(deadline)
        if code != OK or length:
            raise ProtocolError(f"HEALTH answered code {code} with a {length}-byte body")

    def _warn_no_delete(self) -> None:
        if not self._warned_no_delete:
            self._warned_no_delete = True
            logger.warning(
                "lmcache_connector: %s (lmcache_server) cannot delete keys: "
                "stored values stay until the server restarts",
                self.url,
            )


def _text(data: bytearray | None) -> str | None:
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None  # not an entry of ours: a miss
