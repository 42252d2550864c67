"""LMCache's real cache server (``lmcache_server``) on loopback for the tests, and fake servers that misbehave.

The real server is LMCache 0.5.6's own ``lmcache.v1.server`` module, installed by ``scripts/setup.sh``
without its dependencies into ``.venv/lmcache-server`` (``pip install --no-deps --target``; a full
``lmcache`` install would pull a CUDA torch) and run with the project venv's Python, which has the
CPU torch it needs. Each server is started by the test on a free loopback port and killed when its
context manager exits (or with the test process: ``PR_SET_PDEATHSIG``). A missing install is a
test failure that says how to get it, never a skip.

  lm_server(folder, port=None)   the real server; ``kill()`` / ``start()`` for restart tests,
                                 ``pause()`` / ``resume()`` (SIGSTOP / SIGCONT) for a hung one
  silent_server()                accepts connections, reads nothing, answers nothing
  half_body_server(value)        answers one GET with a 200 header for the whole value, sends half of
                                 it, then closes that connection; every later connection gets a miss
  unconfirming_server()          takes PUTs, then closes without answering the HEALTH that confirms them
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from redis_servers import _die_with_parent, free_port

ROOT = Path(__file__).resolve().parent.parent
SERVER_DIR = ROOT / ".venv" / "lmcache-server"
INSTALL = (
    "run scripts/setup.sh, or: .venv/bin/pip install --no-deps --target .venv/lmcache-server "
    "lmcache==0.5.6 sortedcontainers"
)
START_TIMEOUT = 60.0  # importing torch on a busy two-core machine
# The server binds without SO_REUSEADDR, so a restart on the same port would fail for a minute
# while its old connections sit in TIME_WAIT; the restart tests set the option for it (as Redis does).
_LAUNCH = """
import socket, sys
_bind = socket.socket.bind
def bind(self, address):
    self.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return _bind(self, address)
socket.socket.bind = bind
from lmcache.v1.server.__main__ import main
sys.argv = ["lmcache_server", sys.argv[1], sys.argv[2], "cpu"]
main()
"""


class LMServer:
    """One ``lmcache_server`` process started by a test."""

    def __init__(self, folder: Path, port: int | None = None):
        if not (SERVER_DIR / "lmcache" / "v1" / "server" / "__main__.py").is_file():
            pytest.fail(f"LMCache's cache server is not installed in {SERVER_DIR}: {INSTALL}")
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.port = port or free_port()
        self.log = folder / "lmcache_server.log"
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"lm://127.0.0.1:{self.port}"

    def start(self) -> LMServer:
        env = {**os.environ, "PYTHONPATH": str(SERVER_DIR), "CUDA_VISIBLE_DEVICES": ""}
        with open(self.log, "ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _LAUNCH, "127.0.0.1", str(self.port)],
                cwd=self.folder,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until the server answers HEALTH on a connection of its own."""
        deadline = time.monotonic() + timeout
        while True:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"lmcache_server exited with {self._process.returncode}:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                    sock.sendall(health_request())
                    if len(recv_exact(sock, 36)) == 36:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"lmcache_server did not answer within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections and takes requests; nothing is answered."""
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=10)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@contextmanager
def lm_server(folder: Path, port: int | None = None) -> Iterator[LMServer]:
    server = LMServer(folder, port)
    try:
        yield server.start()
    finally:
        server.kill()


# ---------------------------------------------------------------- raw framing for checks and fakes

_REQUEST = struct.Struct("<9i150s")
_RESPONSE = struct.Struct("<9i")


def request(command: int, key: str, length: int = 0) -> bytes:
    """A request header as LMCache's own client frames it (format 1, dtype uint8)."""
    return _REQUEST.pack(command, length, 1, 6, 0, length if command == 1 else 0, 0, 0, 0, key.encode().ljust(150))


def health_request() -> bytes:
    return request(5, "probe@0@0@0@uint8")


def response(code: int, length: int = 0) -> bytes:
    return _RESPONSE.pack(code, length, 1, 6, length, 0, 0, 0, 0)


def raw_put(port: int, key: str, data: bytes) -> None:
    """PUT ``data`` under a server key the way any other client would (to plant values), and wait
    until it is stored (a HEALTH answer on the same connection comes after the PUT)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request(1, key, len(data)) + data + health_request())
        assert len(recv_exact(sock, 36)) == 36


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        piece = sock.recv(n - len(data))
        if not piece:
            break
        data += piece
    return bytes(data)


class FakeServer:
    """A listening socket on a free loopback port; ``handle(conn, index)`` serves each connection
    on a thread of its own. ``connections`` counts what was accepted."""

    def __init__(self, handle):
        self._handle = handle
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.connections = 0
        self._open: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"lm://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        self._listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._open.append(conn)
            index, self.connections = self.connections, self.connections + 1
            threading.Thread(target=self._serve, args=(conn, index), daemon=True).start()

    def _serve(self, conn: socket.socket, index: int) -> None:
        try:
            self._handle(conn, index, self._stop)
        except OSError:
            pass

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for conn in self._open:
            try:
                conn.close()
            except OSError:
                pass
        self._thread.join(timeout=2)


@contextmanager
def silent_server() -> Iterator[FakeServer]:
    """Accepts, then never reads or answers (a hung server whose kernel still completes connects)."""

    def hang(conn: socket.socket, index: int, stop: threading.Event) -> None:
        stop.wait()

    server = FakeServer(hang)
    try:
        yield server
    finally:
        server.close()


@contextmanager
def half_body_server(value: bytes) -> Iterator[FakeServer]:
    """The first connection's first GET gets a 200 header for all of ``value``, then its first
    half, then the connection closes (a server killed mid-GET). Later connections: an empty server."""
    half = value[: len(value) // 2]
    with _empty_server(first_get=lambda conn: conn.sendall(response(200, len(value)) + half)) as server:
        yield server


@contextmanager
def unconfirming_server() -> Iterator[FakeServer]:
    """The first connection takes PUTs, then closes at the first HEALTH without answering it (a
    server killed right after a write). Later connections: an empty server."""
    with _empty_server(first_health=lambda conn: None) as server:
        yield server


@contextmanager
def _empty_server(first_get=None, first_health=None) -> Iterator[FakeServer]:
    """Answers as a server holding nothing: GET and EXIST 400, HEALTH 200, PUTs read and dropped.
    On the first connection, ``first_get`` / ``first_health`` replace the answer to that command,
    and the connection closes after it."""

    def serve(conn: socket.socket, index: int, stop: threading.Event) -> None:
        with conn:
            while not stop.is_set():
                header = recv_exact(conn, _REQUEST.size)
                if len(header) < _REQUEST.size:
                    return
                command, length, *_ = _REQUEST.unpack(header)
                special = {2: first_get, 5: first_health}.get(command) if index == 0 else None
                if special is not None:
                    special(conn)
                    return
                if command == 1:
                    recv_exact(conn, length)
                elif command == 5:
                    conn.sendall(response(200))
                else:
                    conn.sendall(response(400))

    server = FakeServer(serve)
    try:
        yield server
    finally:
        server.close()
