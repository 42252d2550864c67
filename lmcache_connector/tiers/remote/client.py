"""The contract between the remote tier and the store it talks to, and the one place that picks a client.

The remote tier (:mod:`.catalog`, :mod:`.store`) speaks to any key-value store through
:class:`RemoteClient`: values under keys (one per chunk and rank, :func:`value_key`), small block
entries under keys of their own (:func:`side_key`), batched existence checks, and bounded waits.
Redis (:mod:`.redis_client`) is the first client; an S3-compatible object store or LMCache's cache
server fit behind the same methods. :func:`connect_remote` builds the client ``LMCACHE_REMOTE_URL``
names, with the ``LMCACHE_REMOTE_*`` settings.

Every failure a client raises is one of this module's exceptions, never a library's own, so the
tier handles every store alike: :class:`RemoteUnavailableError` (unreachable, timed out,
connection lost: down for now, probed again later) and :class:`RemoteAuthError` (the store refused
the credentials: a configuration error naming the setting to fix).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from lmcache_connector.keys import storage_name
from lmcache_connector.urls import RemoteUrl

if TYPE_CHECKING:
    from lmcache_connector.config import LMCacheConfig

SIDE_KEY_MARK = "b:"  # block entries: <prefix>b:<namespace16>-<rank>-<block fingerprint>


logger = logging.getLogger("lmcache_connector")


class RemoteError(Exception):
    """A remote-store operation failed."""


class RemoteUnavailableError(RemoteError):
    """The store did not answer in time, refused the connection, or dropped it: down for now."""


class RemoteAuthError(RemoteError):
    """The store refused the credentials, or they could not be read: fix the setting the message names."""


@dataclass(frozen=True)
class PutItem:
    """One value to write and the block entries that point to it (each holding ``side_value``)."""

    key: str
    value: bytes | memoryview | Sequence[bytes | memoryview]  # pieces: only for ``takes_value_pieces``
    side_keys: Sequence[str] = ()
    side_value: str | None = None


def put_each(client: RemoteClient, items: Sequence[PutItem], ttl: int | None = None) -> None:
    """``put_many`` for a store that takes one value per request."""
    for item in items:
        client.put(item.key, item.value, item.side_keys, ttl, item.side_value)


class RemoteClient(Protocol):
    """What the remote tier needs of a store. Thread-safe: the catalog's thread, each worker's writer
    and fill threads call it concurrently. Every call returns or raises within the client's timeout."""

    url: RemoteUrl
    key_prefix: str  # put before every key this library writes
    # True when a failure may concern some keys only (one node of a cluster): the tier then treats
    # it as a miss of those keys instead of marking the whole store down.
    failures_are_partial: bool
    # Where a chunk's block entry goes (:func:`entry_fingerprints`): True, under every block boundary
    # (cheap where entries ride in the value's round trip: Redis); False, once under the chunk's
    # first block (one request per entry: S3, lmcache_server).
    entry_every_block: bool

    def ping(self) -> None:
        """Raise unless the store answers."""

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key exists, in as few round trips as the store allows."""

    def put(
        self,
        key: str,
        value: bytes | memoryview,
        side_keys: Sequence[str] = (),
        ttl: int | None = None,
        side_value: str | None = None,
    ) -> None:
        """Write the value, then the block entries (each holding ``side_value``) that point to it."""

    def put_many(self, items: Sequence[PutItem], ttl: int | None = None) -> None:
        """:meth:`put` for several values, in as few round trips as the store allows."""

    def get(self, key: str) -> bytes | None:
        """The value, or ``None`` when it is not there (never written, expired, evicted)."""

    def resolve_side_keys(self, keys: Sequence[str]) -> list[str | None]:
        """What each block entry holds, or ``None`` where there is none."""

    def expire_many(self, keys: Sequence[str], ttl: int) -> list[bool]:
        """Refresh the keys' time to live, where the store has one."""

    def delete_many(self, keys: Sequence[str]) -> int:
        """Remove the keys; how many existed."""

    def delete_matching(self, pattern: str) -> int:
        """Remove every key matching a glob ``pattern`` (``<prefix><namespace16>-*``): resets."""

    def memory(self) -> tuple[int, int]:
        """``(bytes used, bytes allowed)`` of the store, 0 where it cannot tell."""

    # Optional, where a client can read a value into the caller's buffers as it arrives
    # (lmcache_server): ``get_into(key, expect, regions) -> bool``, :func:`~.value.receive_value`
    # over the value; False when there is none; raises a :class:`~.value.RemoteValueError` for a
    # value that is not ``expect``'s chunk.
    # Optional: ``takes_value_pieces = True`` where ``put`` also takes a value as its pieces in order
    # (the header, then the memory slot's regions), so the writer sends them without joining them.
    # Optional, where a store lists cheaply (S3): ``list_keys(prefix, limit) -> list[str]``, the
    # keys that start with ``prefix``, at most ``limit`` of them.

    def close(self) -> None: ...


def value_key(prefix: str, namespace_hex: str, rank: str, key_hex: str) -> str:
    """The key of one rank's copy of a chunk."""
    return prefix + storage_name(namespace_hex, rank, key_hex)


def side_key(prefix: str, namespace_hex: str, rank: str, block_fp_hex: str) -> str:
    """The key of a block boundary inside a chunk (its entry names the chunk, :func:`~.value.encode_block_entry`).

    Marked apart from value keys: a chunk's key is the fingerprint of its last block, so without the
    mark the last block's entry would overwrite the chunk's value."""
    return prefix + SIDE_KEY_MARK + storage_name(namespace_hex, rank, block_fp_hex)


def entry_fingerprints(block_fps: Sequence[bytes], every_block: bool) -> Sequence[bytes]:
    """The block boundaries under which a chunk's entry is written (and a lookup reads).

    Every entry holds the whole chunk (its key and all its block fingerprints), so one entry is
    enough to find a chunk from any prompt that shares its first block: the prompt's fingerprint at
    block *i* matches the entry's *i*-th exactly when the two agree on every token up to there.
    Entries under every boundary also find a chunk whose first-block entry was overwritten by
    another continuation of the same prefix (the last writer wins that key); entries under the first
    block only cost one request a chunk instead of one a block. Either way an entry is a hint: the
    value's header is checked when it is read."""
    return block_fps if every_block else block_fps[:1]


def answers_at_start(what: str, url: object, ping: Callable[[], None], close: Callable[[], None], without: str) -> bool:
    """Whether a store (or registry) answers its first ping, as a tier starts.

    Refused credentials are a start-up error (``close``, then a ValueError naming ``what``): no
    probe would ever fix them. A store that does not answer yet is one warning, and the tier starts
    down (``without`` it), probed in the background until it answers."""
    try:
        ping()
    except RemoteAuthError as exc:
        close()
        raise ValueError(f"{what} cannot start: {exc}") from None
    except RemoteUnavailableError as exc:
        logger.warning(
            "lmcache_connector: %s %s does not answer (%s); starting %s and retrying in the background",
            what,
            url,
            exc,
            without,
        )
        return False
    return True


def served(url: RemoteUrl | None) -> bool:
    """Whether this version has a client for ``url`` (the others are validated, then warned about)."""
    from lmcache_connector.config import SERVED_REMOTE_KINDS

    return url is not None and url.kind in SERVED_REMOTE_KINDS


def connect_remote(url: RemoteUrl, config: LMCacheConfig, socket_timeout_secs: float | None = None) -> RemoteClient:
    """The client for ``url`` with the ``LMCACHE_REMOTE_*`` settings; ``socket_timeout_secs`` overrides
    the per-call bound (``LMCACHE_BLOCKING_TIMEOUT_SECS``), e.g. shorter for lookups. Connects
    lazily: call ``ping`` to check the store."""
    if url.kind == "redis":
        import dataclasses

        from lmcache_connector.tiers.remote.redis_client import RedisOptions, connect_redis

        options = RedisOptions.from_config(config)
        if socket_timeout_secs is not None:
            options = dataclasses.replace(
                options,
                socket_timeout_secs=socket_timeout_secs,
                connect_timeout_secs=min(options.connect_timeout_secs, socket_timeout_secs),
            )
        return connect_redis(url, options)
    if url.kind == "s3" and served(url):
        from lmcache_connector.tiers.remote.s3_client import connect_s3

        return connect_s3(url, config, socket_timeout_secs)
    if url.kind == "lm" and served(url):
        from lmcache_connector.tiers.remote.lm_client import connect_lm

        return connect_lm(url, config, socket_timeout_secs)
    raise ValueError(f"LMCACHE_REMOTE_URL={url}: {url.scheme}:// stores are not served in this version")
