"""Real Redis servers on loopback for the tests: standalone, unix socket, password, TLS, Sentinel, Cluster.

Every server is Debian's ``redis-server`` (``scripts/setup.sh`` installs it), started by the test in
a folder of its own with persistence off (``--save '' --appendonly no``), bound to loopback on free
ports, and killed when its context manager exits (or with the test process: each server gets
``PR_SET_PDEATHSIG``, so a crashed run leaves none behind). Tests never skip for want of a server:
a missing binary is a failure that says how to install it, as for the chart tests' helm.

The pieces, each a context manager yielding a handle:

  redis_server(folder, ...)   one server: TCP, a unix socket, requirepass, TLS (``TlsFiles``),
                              maxmemory and a policy; ``pause()`` / ``resume()`` (SIGSTOP / SIGCONT)
                              and ``kill()`` for outage tests
  tls_files(folder)           a test CA, a server certificate (named ``localhost`` only, so an IP
                              address fails the hostname check) and a client certificate
  sentinel_set(folder, ...)   a master, one replica and three Sentinels watching them, ready for a
                              failover (``fail_over()`` kills the master and waits for the promotion)
  cluster(folder, ...)        three masters joined by ``redis-cli --cluster create``, every slot covered

``admin()`` on a handle is a plain redis-py client for inspecting a server behind the client under test.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

INSTALL = "run scripts/setup.sh, or: apt-get install -y redis-server redis-tools"
START_TIMEOUT = 10.0
_PR_SET_PDEATHSIG = 1


def binary(name: str) -> str:
    """The path of ``name`` (redis-server, redis-cli, openssl), or a test failure saying how to get it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; the remote-tier tests need real Redis servers: {INSTALL}")
    return path


def free_port(with_cluster_bus: bool = False) -> int:
    """A TCP port nobody listens on now (and, for a cluster node, its bus port: port + 10000)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if not with_cluster_bus:
            return port
        if port + 10000 <= 65535 and _port_is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: the kernel kills the server when the test process dies.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


# ---------------------------------------------------------------- one server


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


class RedisServer:
    """One redis-server (or Sentinel) process started by a test."""

    def __init__(self, name: str, folder: Path, args: list[str], port: int | None, password: str | None = None):
        self.name = name
        self.folder = folder
        self.port = port  # plain TCP port (None: unix socket only)
        self.password = password
        self.unix_socket: str | None = None
        self.tls_port: int | None = None
        self.log = folder / f"{name}.log"
        self._args = args
        self._process: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        with open(self.log, "ab") as log:
            self._process = subprocess.Popen(
                [binary("redis-server"), *self._args],
                cwd=self.folder,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        self.wait_ready()
        return self

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def admin(self, **kwargs) -> redis.Redis:
        """A plain client for this server (not the client under test)."""
        where = (
            {"unix_socket_path": self.unix_socket} if self.port is None else {"host": "127.0.0.1", "port": self.port}
        )
        return redis.Redis(**where, password=self.password, socket_timeout=2, **kwargs)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self._process.returncode}:\n{self.log_tail()}")
            try:
                with self.admin(socket_connect_timeout=0.5) as client:
                    client.ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not answer within {timeout} s:\n{self.log_tail()}") from None
                time.sleep(0.02)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets (the kernel still accepts connections) but answers nothing."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL and reap; harmless when already gone. A paused server is woken so that it can die."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.kill()
        os.kill(self.pid, signal.SIGCONT)
        self._process.wait(timeout=10)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _base_args(folder: Path, port: int | None) -> list[str]:
    return [
        "--port",
        str(port or 0),
        "--bind",
        "127.0.0.1",
        "-::1",  # IPv6 loopback when the machine has it ('-': optional), so 'localhost' works either way
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(folder),
        "--daemonize",
        "no",
        "--logfile",
        "",
    ]


@contextmanager
def redis_server(
    folder: Path,
    name: str = "redis",
    *,
    tcp: bool = True,
    port: int | None = None,
    unix_socket: bool = False,
    password: str | None = None,
    tls: TlsFiles | None = None,
    tls_auth_clients: bool = True,
    maxmemory: str | None = None,
    policy: str = "allkeys-lru",
    extra: tuple[str, ...] = (),
) -> Iterator[RedisServer]:
    """One standalone server. With ``tls``, a TLS port beside the plain one (the plain one is for ``admin``);
    ``port`` restarts a server where a killed one was."""
    folder.mkdir(parents=True, exist_ok=True)
    port = (port or free_port()) if tcp else None
    args = _base_args(folder, port)
    if password:
        args += ["--requirepass", password]
    if maxmemory:
        args += ["--maxmemory", maxmemory, "--maxmemory-policy", policy]
    server = RedisServer(name, folder, args, port, password)
    if unix_socket:
        server.unix_socket = str(folder / f"{name}.sock")
        args += ["--unixsocket", server.unix_socket, "--unixsocketperm", "700"]
    if tls is not None:
        server.tls_port = free_port()
        args += [
            "--tls-port",
            str(server.tls_port),
            "--tls-cert-file",
            str(tls.server_cert),
            "--tls-key-file",
            str(tls.server_key),
            "--tls-ca-cert-file",
            str(tls.ca),
            "--tls-auth-clients",
            "yes" if tls_auth_clients else "no",
        ]
    args += list(extra)
    try:
        yield server.start()
    finally:
        server.kill()


# ---------------------------------------------------------------- TLS


def tls_files(folder: Path) -> TlsFiles:
    """A throwaway CA and two certificates it signed (EC keys: much faster to make than RSA)."""
    folder.mkdir(parents=True, exist_ok=True)
    openssl = binary("openssl")
    key_args = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", *key_args, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=lmcache test CA")
    for name, extension in (
        ("server", "subjectAltName=DNS:localhost"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        (folder / f"{name}.ext").write_text(extension + "\n")
        run("req", *key_args, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=lmcache test {name}")
        run(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext",
        )  # fmt: skip
    return TlsFiles(
        ca=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
    )


# ---------------------------------------------------------------- Sentinel


@dataclass
class SentinelSet:
    master: RedisServer
    replica: RedisServer
    sentinels: list[RedisServer]
    service_name: str

    @property
    def sentinel_hosts(self) -> str:
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def master_port(self) -> int:
        """The master's port as the first Sentinel that answers reports it."""
        for sentinel in self.sentinels:
            try:
                with sentinel.admin() as client:
                    _, port = client.sentinel_get_master_addr_by_name(self.service_name)
                return int(port)
            except redis.RedisError:
                continue
        raise RuntimeError("no Sentinel answered")

    def wait_replicated(self, timeout_ms: int = 3000) -> None:
        """Until the replica has every write the master took so far (WAIT)."""
        with self.master.admin() as client:
            acknowledged = client.execute_command("WAIT", 1, timeout_ms)
        if acknowledged < 1:
            raise RuntimeError("the replica did not acknowledge the master's writes")

    def fail_over(self, timeout: float = 20.0) -> None:
        """Kill the master and wait until the Sentinels have promoted the replica."""
        self.master.kill()
        deadline = time.monotonic() + timeout
        while self.master_port() != self.replica.port:
            if time.monotonic() > deadline:
                logs = "\n".join(s.log_tail(8) for s in self.sentinels)
                raise RuntimeError(f"no failover within {timeout} s:\n{logs}")
            time.sleep(0.1)
        with self.replica.admin() as client:  # the promotion is announced before the replica takes writes
            while client.info("replication")["role"] != "master":
                if time.monotonic() > deadline:
                    raise RuntimeError("the promoted replica never became a master")
                time.sleep(0.05)


@contextmanager
def sentinel_set(
    folder: Path, *, password: str | None = None, sentinel_password: str | None = None, service_name: str = "mymaster"
) -> Iterator[SentinelSet]:
    """A master, a replica and three Sentinels (quorum 2) with short timeouts, everything known to everyone.

    ``password`` is the master's and the replica's ``requirepass``; ``sentinel_password`` the
    Sentinels' own. Returns once the Sentinels know the replica and each other, so a failover can
    start as soon as a test kills the master.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        data_args = ["--requirepass", password, "--masterauth", password] if password else []
        # Full syncs start at once: Redis otherwise waits 5 s for more replicas to share one transfer.
        data_args += ["--repl-diskless-sync-delay", "0"]
        master_port, replica_port = free_port(), free_port()
        master = RedisServer("master", folder, [*_base_args(folder, master_port), *data_args], master_port, password)
        replica_args = [*_base_args(folder, replica_port), *data_args, "--replicaof", "127.0.0.1", str(master_port)]
        replica = RedisServer("replica", folder, replica_args, replica_port, password)
        for server in (master, replica):
            stack.callback(server.kill)
            server.start()
        _wait_for(lambda: _replica_linked(replica), "the replica to link to the master")

        sentinels = []
        for i in range(3):
            port = free_port()
            conf = folder / f"sentinel-{i}.conf"  # Sentinel rewrites its file: one writable file each
            lines = [
                f"port {port}",
                "bind 127.0.0.1",
                f"dir {folder}",
                'logfile ""',
                f"sentinel monitor {service_name} 127.0.0.1 {master_port} 2",
                f"sentinel down-after-milliseconds {service_name} 500",
                f"sentinel failover-timeout {service_name} 5000",
                f"sentinel parallel-syncs {service_name} 1",
            ]
            if password:
                lines.append(f"sentinel auth-pass {service_name} {password}")
            if sentinel_password:
                lines.append(f"requirepass {sentinel_password}")  # also what Sentinels tell each other
            conf.write_text("\n".join(lines) + "\n")
            sentinel = RedisServer(f"sentinel-{i}", folder, [str(conf), "--sentinel"], port, sentinel_password)
            stack.callback(sentinel.kill)
            sentinels.append(sentinel.start())

        def everyone_known() -> bool:
            for sentinel in sentinels:
                with sentinel.admin() as client:
                    if len(client.sentinel_slaves(service_name)) < 1:
                        return False
                    if len(client.sentinel_sentinels(service_name)) < 2:
                        return False
            return True

        _wait_for(everyone_known, "the Sentinels to find the replica and each other", timeout=15)
        yield SentinelSet(master, replica, sentinels, service_name)


def _replica_linked(replica: RedisServer) -> bool:
    with replica.admin() as client:
        return client.info("replication").get("master_link_status") == "up"


# ---------------------------------------------------------------- Cluster


@dataclass
class Cluster:
    nodes: list[RedisServer]

    @property
    def hosts(self) -> str:
        return ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)


@contextmanager
def cluster(folder: Path, size: int = 3, node_timeout_ms: int = 1000) -> Iterator[Cluster]:
    """``size`` masters, no replicas, every slot assigned; a node that dies leaves the others serving."""
    folder.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        nodes = []
        for i in range(size):
            port = free_port(with_cluster_bus=True)
            args = [
                *_base_args(folder, port),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{i}.conf",
                "--cluster-node-timeout",
                str(node_timeout_ms),
                "--cluster-require-full-coverage",
                "no",
            ]
            node = RedisServer(f"node-{i}", folder, args, port)
            stack.callback(node.kill)
            nodes.append(node.start())
        create = [binary("redis-cli"), "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes)]
        done = subprocess.run(
            [*create, "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}\n{done.stderr}")

        def all_ok() -> bool:
            for node in nodes:
                with node.admin() as client:
                    info = client.execute_command("CLUSTER", "INFO")
                    text = info.decode() if isinstance(info, bytes) else str(info)
                    if "cluster_state:ok" not in text or f"cluster_known_nodes:{size}" not in text:
                        return False
            return True

        _wait_for(all_ok, "every node to see the whole cluster", timeout=15)
        yield Cluster(nodes)


def _wait_for(condition, what: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
