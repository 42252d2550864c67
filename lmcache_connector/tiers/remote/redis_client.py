"""A Redis client for the remote tier: every URL form, a handful of batched operations, bounded waits.

:func:`connect_redis` builds a :class:`RedisClient` from a parsed ``LMCACHE_REMOTE_URL``
(:class:`lmcache_connector.urls.RemoteUrl`) and :class:`RedisOptions` (the ``LMCACHE_REMOTE_*``
settings):

  redis://, rediss://   one server (rediss://, or LMCACHE_REMOTE_TLS, adds TLS: CA, client
                        certificate and key, hostname check)
  unix://               one server on a local socket
  redis-sentinel://     the master of a Sentinel service; reads and writes both go to the master, so
                        a fresh write is never a miss because a replica lags; a failover is followed
                        (each new connection asks the Sentinels where the master is)
  redis-cluster://      Redis Cluster; batches go to each node in one round trip

Operations, each one or a few round trips, none waiting longer than the socket timeout:

  exists_many(keys)                  which keys exist (a pipeline of EXISTS; per node on a cluster)
  put(key, value, side_keys)         the value and the block entries pointing to it, one pipeline,
                                     each with the same TTL when one is set
  get(key)                           the value or None; a hit refreshes the TTL (GETEX)
  resolve_side_keys(keys)            what each block entry holds (the chunk it points to), or None (MGET)
  expire_many(keys, ttl), delete_many(keys), delete_matching(pattern), memory(), ping()

Every failure is one of this module's exceptions, never a redis-py one, so callers need not import
redis: :class:`RemoteUnavailableError` (unreachable, timed out, connection lost: the tier is down
for now) and :class:`RemoteAuthError` (the server refused the credentials: a configuration error
that names the setting to fix). Without redis-py installed, :func:`connect_redis` raises
:class:`RedisNotInstalledError` saying which extra to install.

Keys follow the one storage-name rule of :mod:`lmcache_connector.keys`, behind the key prefix:
:func:`value_key` for a rank's copy of a chunk, :func:`side_key` for a block boundary inside it.

Passwords are read from their files once, when the client is built, and never logged; messages show
the URL redacted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from lmcache_connector.tiers.remote.client import (  # noqa: F401 (the contract's errors and keys, re-exported)
    SIDE_KEY_MARK,
    PutItem,
    RemoteAuthError,
    RemoteError,
    RemoteUnavailableError,
    side_key,
    value_key,
)
from lmcache_connector.urls import RemoteUrl

if TYPE_CHECKING:
    from lmcache_connector.config import LMCacheConfig

logger = logging.getLogger("lmcache_connector")

INSTALL_HINT = "pip install 'lmcache-connector[redis]'"

_T = TypeVar("_T")

RedisOp = tuple[str, Callable[[Any], Any]]  # a key, and what to queue on a pipeline for it


class RedisNotInstalledError(ImportError):
    """A Redis URL is configured but redis-py is not installed."""


@dataclass(frozen=True)
class RedisOptions:
    """Everything but the URL: the ``LMCACHE_REMOTE_*`` settings and the timeouts."""

    password_file: str | None = None
    sentinel_password_file: str | None = None
    service_name: str | None = None  # overrides the URL's default "mymaster"
    tls: bool = False  # rediss:// turns it on by itself
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_check_hostname: bool = True
    key_prefix: str = "lmc:"
    ttl_secs: int | None = None
    socket_timeout_secs: float = 5.0  # bounds every read and write on an open connection
    connect_timeout_secs: float = 2.0

    @classmethod
    def from_config(cls, config: LMCacheConfig) -> RedisOptions:
        # A fetch is bounded by LMCACHE_BLOCKING_TIMEOUT_SECS; a lookup's own, shorter deadline
        # (LMCACHE_REMOTE_LOOKUP_TIMEOUT_MS) is kept by the catalog, which never waits on a socket.
        timeout = config.blocking_timeout_secs
        return cls(
            password_file=config.remote_password_file,
            sentinel_password_file=config.remote_sentinel_password_file,
            service_name=config.remote_service_name,
            tls=config.remote_tls,
            tls_ca_file=config.remote_tls_ca_file,
            tls_cert_file=config.remote_tls_cert_file,
            tls_key_file=config.remote_tls_key_file,
            tls_check_hostname=config.remote_tls_check_hostname,
            key_prefix=config.remote_key_prefix,
            ttl_secs=config.remote_ttl_secs,
            socket_timeout_secs=timeout,
            connect_timeout_secs=min(timeout, 2.0),
        )


def connect_redis(url: RemoteUrl, options: RedisOptions) -> RedisClient:
    """A client for ``url``. Connects lazily: call :meth:`RedisClient.ping` to check the store at start."""
    redis = _import_redis()
    if url.kind != "redis":
        raise ValueError(f"{url} is not a Redis URL")
    if url.scheme == "unix" and options.tls:
        raise ValueError(f"LMCACHE_REMOTE_TLS=True with {url}: a unix socket carries no TLS")
    password, password_source = _password(url, options)
    common: dict[str, Any] = {
        "username": url.username,
        "password": password,
        "socket_timeout": options.socket_timeout_secs,
        "socket_connect_timeout": options.connect_timeout_secs,
        # One retry on a connection error replaces a connection that died while idle (a restarted
        # server); none on a timeout, which would double the wait on a server that hangs.
        "retry": redis.retry.Retry(redis.backoff.NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        **_tls_kwargs(url, options),
    }
    if url.scheme == "redis-cluster":
        nodes = [redis.cluster.ClusterNode(host, port) for host, port in url.hosts]
        client = redis.RedisCluster(startup_nodes=nodes, require_full_coverage=False, **common)
    elif url.scheme == "redis-sentinel":
        client = _sentinel_master(redis, url, options, common)
    elif url.scheme == "unix":
        common.pop("retry")  # a local socket: a dead connection is refused at once, nothing to retry
        client = redis.Redis(unix_socket_path=url.socket_path, db=url.db or 0, **common)
    else:
        (host, port), *_ = url.hosts
        client = redis.Redis(host=host, port=port, db=url.db or 0, **common)
    return RedisClient(client, url, options, password_source)


class RedisClient:
    """One process's connections to a Redis store: a :class:`~.client.RemoteClient` (thread-safe:
    redis-py pools its connections)."""

    def __init__(self, client: Any, url: RemoteUrl, options: RedisOptions, password_source: str):
        self._client = client
        self._cluster = url.scheme == "redis-cluster"
        self.url = url
        self.options = options
        self.key_prefix = options.key_prefix
        self.failures_are_partial = self._cluster  # a dead node costs its own keys only
        self.entry_every_block = True  # entries ride in the value's pipeline: one under every block
        self._password_source = password_source

    def __repr__(self) -> str:
        return f"RedisClient({self.url})"

    # ------------------------------------------------------------ operations

    def ping(self) -> None:
        """Raise unless the store answers (on a cluster: every node the client knows of)."""
        with self._errors("PING"):
            if self._cluster:
                self._client.ping(target_nodes=self._client.ALL_NODES)
            else:
                self._client.ping()

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key exists, in one round trip (per node on a cluster: a key on a node that
        does not answer counts as absent, unless no node answers)."""
        if self._cluster:
            return [bool(found) for found in self._per_node("EXISTS", keys, lambda pipe, key: pipe.exists(key))]
        # One EXISTS per key, pipelined: a multi-key EXISTS answers only how many exist.
        return [bool(count) for count in self._pipelined("EXISTS", keys, lambda pipe, key: pipe.exists(key))]

    def put(
        self,
        key: str,
        value: bytes | memoryview,
        side_keys: Sequence[str] = (),
        ttl: int | None = None,
        side_value: str | None = None,
    ) -> None:
        """Write the value and the block entries that point to it, in one pipeline.

        Every entry holds ``side_value`` (by default the value's key; the remote tier stores a
        block entry describing the chunk, :func:`~.value.encode_block_entry`). The value goes first:
        on one server the pipeline runs in order, so no entry ever points to a value not yet
        written. ``ttl`` (seconds) applies to every key; ``None``: the option's TTL.
        """
        self.put_many([PutItem(key, value, side_keys, side_value)], ttl)

    def put_many(self, items: Sequence[PutItem], ttl: int | None = None) -> None:
        """:meth:`put` for several values in one pipeline (one round trip; per node on a cluster)."""
        ttl = self.options.ttl_secs if ttl is None else ttl
        with self._errors("SET"):
            pipe = self._client.pipeline(transaction=False)
            for item in items:
                # A memoryview, not bytes: with hiredis installed, redis-py packs a command of bytes
                # through hiredis, which copies the value (about 3x slower for a 4 MiB chunk); a
                # memoryview makes it send the buffer as it is.
                pipe.set(item.key, memoryview(item.value), ex=ttl)
                entry = item.key if item.side_value is None else item.side_value
                for side in item.side_keys:
                    pipe.set(side, entry, ex=ttl)
            pipe.execute()

    def get(self, key: str) -> bytes | None:
        """The value, or ``None`` when the key is absent (never written, expired or evicted).

        A hit refreshes the TTL, so the chunks in use stay while the unused ones expire."""
        ttl = self.options.ttl_secs
        with self._errors("GET"):
            return self._client.getex(key, ex=ttl) if ttl else self._client.get(key)

    def resolve_side_keys(self, keys: Sequence[str]) -> list[str | None]:
        """What each block entry holds (the value it points to), or ``None`` where there is no entry."""
        if not keys:
            return []
        if self._cluster:
            found = self._per_node("GET", keys, lambda pipe, key: pipe.get(key))
        else:
            with self._errors("MGET"):
                found = self._client.mget(keys)
        return [None if value is None else value.decode() for value in found]

    def expire_many(self, keys: Sequence[str], ttl: int) -> list[bool]:
        """Set each key's TTL (e.g. a chunk's block entries after a hit); ``False`` where it is gone."""
        return self._pipelined("EXPIRE", keys, lambda pipe, key: pipe.expire(key, ttl))

    def delete_many(self, keys: Sequence[str]) -> int:
        """Remove the keys; how many existed."""
        return sum(self._pipelined("DEL", keys, lambda pipe, key: pipe.delete(key)))

    def delete_matching(self, pattern: str, batch: int = 500) -> int:
        """Remove every key matching ``pattern`` (SCAN, then DEL in batches; on every node of a
        cluster); how many were removed. For resets: a namespace's keys, never the whole database."""
        removed = 0
        with self._errors("SCAN"):
            found: list[str] = []
            iterator = (
                self._client.scan_iter(match=pattern, count=batch, target_nodes=self._client.ALL_NODES)
                if self._cluster
                else self._client.scan_iter(match=pattern, count=batch)
            )
            for key in iterator:
                found.append(key)
                if len(found) >= batch:
                    removed += self.delete_many(found)
                    found = []
            removed += self.delete_many(found)
        return removed

    def memory(self) -> tuple[int, int]:
        """``(used_memory, maxmemory)`` in bytes, summed over a cluster's nodes (0: no bound)."""
        with self._errors("INFO"):
            info = self._client.info("memory")
        nodes = info.values() if self._cluster and all(isinstance(v, dict) for v in info.values()) else [info]
        used = sum(int(node.get("used_memory", 0)) for node in nodes)
        bound = sum(int(node.get("maxmemory", 0)) for node in nodes)
        return used, bound

    def batch(self, command: str, ops: Sequence[RedisOp]) -> list[Any]:
        """Run ``ops`` (a key, and what to queue on a pipeline for it) in one pipeline, per node on a
        cluster (ops on a node that fails give ``None``, unless every node fails; a command a node
        refuses gives ``None`` for its own position); their replies, in order. For callers with
        commands of their own (the P2P registry's sets and strings); ``command`` names them in errors."""
        if not ops:
            return []
        if not self._cluster:
            with self._errors(command):
                pipe = self._client.pipeline(transaction=False)
                for _, queue in ops:
                    queue(pipe)
                return pipe.execute()
        keys = [key for key, _ in ops]
        return self._per_node_at(command, keys, lambda pipe, i: ops[i][1](pipe), reply_errors_as_none=True)

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # closing a client whose server is gone must not raise at shutdown
            logger.debug("closing the Redis client failed", exc_info=True)

    # ------------------------------------------------------------ pieces

    def _pipelined(self, command: str, keys: Sequence[str], add: Callable[[Any, str], Any]) -> list[Any]:
        if not keys:
            return []
        with self._errors(command):
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                add(pipe, key)
            return pipe.execute()

    def _per_node(self, command: str, keys: Sequence[str], add: Callable[[Any, str], Any]) -> list[Any]:
        """A cluster batch as one pipeline per node. A node that fails gives ``None`` for its keys
        (a killed node costs its keys, not the whole answer); when every node fails, the error."""
        return self._per_node_at(command, keys, lambda pipe, i: add(pipe, keys[i]))

    def _per_node_at(
        self,
        command: str,
        keys: Sequence[str],
        add_at: Callable[[Any, int], Any],
        reply_errors_as_none: bool = False,
    ) -> list[Any]:
        """:meth:`_per_node` with the command of position *i* queued by ``add_at(pipe, i)`` (several
        commands may name one key). With ``reply_errors_as_none``, a command the node refused gives
        ``None`` for its own position instead of failing its node's whole pipeline."""
        if not keys:
            return []
        by_node: dict[str, tuple[Any, list[int]]] = {}
        with self._errors(command):
            for i, key in enumerate(keys):
                node = self._client.get_node_from_key(key)
                by_node.setdefault(node.name, (node, []))[1].append(i)
        results: list[Any] = [None] * len(keys)
        failures: list[RemoteError] = []
        for node, positions in by_node.values():
            try:
                with self._errors(command):
                    pipe = self._client.get_redis_connection(node).pipeline(transaction=False)
                    for i in positions:
                        add_at(pipe, i)
                    replies = pipe.execute(raise_on_error=not reply_errors_as_none)
                    for i, value in zip(positions, replies, strict=True):
                        results[i] = None if isinstance(value, Exception) else value
            except RemoteError as exc:
                failures.append(exc)
        if failures and len(failures) == len(by_node):
            raise failures[0]
        return results

    @contextmanager
    def _errors(self, command: str) -> Iterator[None]:
        """Turn redis-py's exceptions into this module's, naming the setting to fix where there is one."""
        import redis

        try:
            yield
        except redis.AuthenticationError as exc:
            raise RemoteAuthError(self._auth_message(exc)) from None
        except redis.sentinel.MasterNotFoundError as exc:
            if _is_auth_failure(str(exc)):
                raise RemoteAuthError(self._sentinel_auth_message()) from None
            raise RemoteUnavailableError(f"{command} on {self.url}: no master found ({exc})") from None
        except redis.ResponseError as exc:
            if _is_auth_failure(str(exc)):
                raise RemoteAuthError(self._auth_message(exc)) from None
            raise RemoteUnavailableError(f"{command} on {self.url} failed: {exc}") from None
        except (redis.RedisError, OSError) as exc:  # connection, timeout, cluster and TLS errors alike
            raise RemoteUnavailableError(f"{command} on {self.url} failed: {type(exc).__name__}: {exc}") from None

    def _sentinel_auth_message(self) -> str:
        if self.options.sentinel_password_file is None:
            return (
                f"the Sentinels of {self.url} need a password of their own: "
                "set LMCACHE_REMOTE_SENTINEL_PASSWORD_FILE (the Sentinels' requirepass)"
            )
        return (
            f"the Sentinels of {self.url} refused the password: check LMCACHE_REMOTE_SENTINEL_PASSWORD_FILE="
            f"{self.options.sentinel_password_file!r} (the Sentinels' requirepass)"
        )

    def _auth_message(self, exc: Exception) -> str:
        if self._password_source == "none":
            # The server's own words here are about AUTH and HELLO, which say nothing to an operator.
            return (
                f"{self.url} refused a client without a password: the server needs a password: "
                "set LMCACHE_REMOTE_PASSWORD_FILE or put it in LMCACHE_REMOTE_URL"
            )
        reason = str(exc).split("\n")[0].rstrip(".")
        return f"{self.url} refused the credentials ({reason}): check {self._password_source}"


# ---------------------------------------------------------------- building


def _import_redis() -> Any:
    try:
        import redis
        import redis.backoff
        import redis.cluster
        import redis.retry
        import redis.sentinel
    except ImportError:
        raise RedisNotInstalledError(
            f"LMCACHE_REMOTE_URL names a Redis store, but the Redis client is not installed: {INSTALL_HINT}"
        ) from None
    return redis


def read_password_file(path: str, setting: str) -> str:
    """The password in ``path``: its text without the line break a Secret or ``echo`` leaves at the end."""
    try:
        with open(path, encoding="utf-8") as f:
            password = f.read().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise RemoteAuthError(f"{setting}={path!r}: cannot read the password ({type(exc).__name__})") from None
    if not password:
        raise RemoteAuthError(f"{setting}={path!r}: the file is empty")
    return password


def _password(url: RemoteUrl, options: RedisOptions) -> tuple[str | None, str]:
    """The master's password and where it came from (named in an authentication error)."""
    if options.password_file:
        if url.password is not None:
            raise ValueError(
                f"LMCACHE_REMOTE_URL={url} and LMCACHE_REMOTE_PASSWORD_FILE both give a password: keep one"
            )
        password = read_password_file(options.password_file, "LMCACHE_REMOTE_PASSWORD_FILE")
        return password, f"LMCACHE_REMOTE_PASSWORD_FILE={options.password_file!r}"
    if url.password is not None:
        return url.password, "the password in LMCACHE_REMOTE_URL"
    return None, "none"


def _tls_kwargs(url: RemoteUrl, options: RedisOptions) -> dict[str, Any]:
    if not (url.tls or options.tls):
        return {}
    return {
        "ssl": True,
        "ssl_cert_reqs": "required",  # the server is always verified; the CA may be the system's
        "ssl_ca_certs": options.tls_ca_file,
        "ssl_certfile": options.tls_cert_file,
        "ssl_keyfile": options.tls_key_file,
        "ssl_check_hostname": options.tls_check_hostname,
    }


def _sentinel_master(redis: Any, url: RemoteUrl, options: RedisOptions, common: dict[str, Any]) -> Any:
    """The master of the service, as a client that asks the Sentinels again after a failover."""
    sentinel_kwargs = {
        key: value for key, value in common.items() if key.startswith(("socket_", "ssl")) or key == "retry"
    }
    if options.sentinel_password_file:
        sentinel_kwargs["password"] = read_password_file(
            options.sentinel_password_file, "LMCACHE_REMOTE_SENTINEL_PASSWORD_FILE"
        )
    service = options.service_name or url.service_name
    sentinel = redis.sentinel.Sentinel(list(url.hosts), sentinel_kwargs=sentinel_kwargs, **common)
    return sentinel.master_for(service, db=url.db or 0)


def _is_auth_failure(message: str) -> bool:
    text = message.lower()
    return any(
        mark in text
        for mark in ("noauth", "noperm", "wrongpass", "invalid password", "invalid username-password", "auth ")
    )
