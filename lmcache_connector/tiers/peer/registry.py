"""The lookup registry: which live instance holds which chunk, kept in Redis (``LMCACHE_LOOKUP_URL``).

Every Redis form of the remote tier works (``redis://``, ``rediss://``, ``unix://``,
``redis-sentinel://``, ``redis-cluster://``, password files, TLS): the connection is built by the
remote tier's :func:`~lmcache_connector.tiers.remote.redis_client.connect_redis`.

Key layout (``<prefix>`` is ``LMCACHE_REMOTE_KEY_PREFIX``, ``lmc:``; ``<ns16>`` the first 16 hex
digits of the namespace digest, which covers model identity, dtype, layout, chunk size and TP/PP
size; ``all`` stands where a storage name has a rank, because an entry covers every rank of an
instance, the worker of rank *r* serving at the advertised port + *r*)::

    <prefix>p2p:live:<ns16>-<instance>     "1", expires after live_ttl: the instance's heartbeat
    <prefix>p2p:h:<ns16>-all-<chunk key>   set of instance ids (``HOST:PORT/INCARNATION``) holding
                                           the chunk; expires holder_ttl after its last publish
    <prefix>p2p:b:<ns16>-all-<block fp>    block entry (``<key>:<fp>,<fp>,...``, the remote tier's
                                           format) under every block boundary of a chunk but its
                                           last; expires holder_ttl after its last publish

Expiry, on Redis 7.0 (no per-member TTL):

* an instance refreshes its liveness key every live_ttl / 3 (:mod:`.publisher`); a lookup counts a
  member only while its liveness key exists (what it saw is remembered for at most
  :data:`LIVENESS_CACHE_S`, and never longer than live_ttl / 4), so an instance that dies stops
  being a holder within 1.25 x live_ttl, whatever its entries say;
* a lookup that meets a member whose liveness key is gone removes it from that set (SREM), so dead
  members do not pile up; and every holder set and block entry expires by itself holder_ttl after
  it was last published: a publisher re-publishes what it holds every holder_ttl / 2, and after
  its own liveness key lapsed (a stall, a registry restart), so a live instance's entries never
  expire and a dead one's all vanish within holder_ttl;
* a withdrawal (eviction) is a SREM of the instance from the chunk's set; block entries are shared
  by every holder of the chunk and are left to expire.

A lookup of any number of chunk-sized questions is at most three round trips (pipelines; per node
on a cluster): the block entries under every asked boundary with each question's own holder set;
the holder sets of the other chunks the entries name; the liveness of members not seen lately. It
answers, per asked block boundary, the chunk holding it that has the most leading blocks, with
every live holder (an instance may exclude itself), like the remote tier's
:class:`~lmcache_connector.tiers.remote.catalog.RemoteCatalog`: a prompt that shares only part of
a chunk finds it block by block.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmcache_connector.keys import storage_name
from lmcache_connector.tiers.base import StoredChunk
from lmcache_connector.tiers.peer.addresses import InstanceId
from lmcache_connector.tiers.remote.redis_client import RedisClient, RedisOp, RedisOptions, RemoteError, connect_redis
from lmcache_connector.tiers.remote.value import decode_block_entry, encode_block_entry
from lmcache_connector.urls import RemoteUrl

if TYPE_CHECKING:
    from lmcache_connector.config import LMCacheConfig

LIVE_TTL_S = 10.0
HOLDER_TTL_S = 3600.0
LIVENESS_CACHE_S = 1.0
ALL_RANKS = "all"
REGISTRY_SOCKET_TIMEOUT_S = 1.0
MAX_HOLDERS = 64  # members read per chunk (SRANDMEMBER): enough holders to try, bounded whatever is planted


def live_key(prefix: str, namespace_hex: str, instance: InstanceId) -> str:
    return f"{prefix}p2p:live:{namespace_hex[:16]}-{instance}"


def holders_key(prefix: str, namespace_hex: str, key_hex: str) -> str:
    return f"{prefix}p2p:h:" + storage_name(namespace_hex, ALL_RANKS, key_hex)


def entry_key(prefix: str, namespace_hex: str, block_fp_hex: str) -> str:
    return f"{prefix}p2p:b:" + storage_name(namespace_hex, ALL_RANKS, block_fp_hex)


@dataclass(frozen=True)
class PeerChunk:
    """A chunk some live instances hold, and who (never empty)."""

    chunk: StoredChunk
    holders: tuple[InstanceId, ...]


def registry_options(config: LMCacheConfig, socket_timeout_s: float = REGISTRY_SOCKET_TIMEOUT_S) -> RedisOptions:
    """The registry's connection settings: the ``LMCACHE_REMOTE_*`` password file, Sentinel and TLS
    settings and key prefix (as ``lmcache-connector config --check-remote`` uses them), with a short
    socket timeout: only background threads wait on the registry, and never for long."""
    options = RedisOptions.from_config(config)
    timeout = min(socket_timeout_s, config.blocking_timeout_secs)
    return dataclasses.replace(options, ttl_secs=None, socket_timeout_secs=timeout, connect_timeout_secs=timeout)


def connect_registry(url: RemoteUrl, options: RedisOptions) -> RedisClient:
    """A registry connection for ``url`` (``LMCACHE_LOOKUP_URL``), built as the remote tier builds its own."""
    return connect_redis(url, options)  # every URL form, password and TLS setting, as the remote tier's


class PeerRegistry:
    """One namespace's view of the registry; thread-safe. Every call is a few round trips and
    raises :class:`~lmcache_connector.tiers.remote.client.RemoteError` when the registry fails."""

    def __init__(
        self,
        redis: RedisClient,
        namespace_hex: str,
        key_prefix: str = "lmc:",
        live_ttl_s: float = LIVE_TTL_S,
        holder_ttl_s: float = HOLDER_TTL_S,
    ):
        self.redis = redis
        self.namespace_hex = namespace_hex
        self.prefix = key_prefix
        self.live_ttl_s = live_ttl_s
        self.holder_ttl_s = holder_ttl_s
        self.liveness_cache_s = min(LIVENESS_CACHE_S, live_ttl_s / 4)
        self._live: dict[InstanceId, tuple[bool, float]] = {}  # liveness seen, and when
        self._lock = threading.Lock()

    # ------------------------------------------------------------ an instance's own entries

    def heartbeat(self, instance: InstanceId) -> bool:
        """Renew the instance's liveness; whether it was still alive (False: it lapsed or never was,
        and what it published may have been pruned: publish it again)."""
        key = live_key(self.prefix, self.namespace_hex, instance)
        ttl_ms = _ms(self.live_ttl_s)
        existed, _ = self.redis.batch(
            "SET", [(key, lambda p: p.exists(key)), (key, lambda p: p.set(key, "1", px=ttl_ms))]
        )
        return bool(existed)

    def publish(self, instance: InstanceId, chunks: Sequence[StoredChunk]) -> None:
        """The instance holds ``chunks``: add it to their holder sets, write their block entries."""
        member, ttl_ms = str(instance), _ms(self.holder_ttl_s)
        ops: list[RedisOp] = []
        for chunk in chunks:
            held = holders_key(self.prefix, self.namespace_hex, chunk.key.hex())
            ops.append((held, lambda p, k=held: p.sadd(k, member)))
            ops.append((held, lambda p, k=held: p.pexpire(k, ttl_ms)))
            entry = encode_block_entry(chunk.key.hex(), [fp.hex() for fp in chunk.block_fps])
            for fp in chunk.block_fps[:-1]:
                name = entry_key(self.prefix, self.namespace_hex, fp.hex())
                ops.append((name, lambda p, k=name, v=entry: p.set(k, v, px=ttl_ms)))
        self.redis.batch("SADD", ops)

    def withdraw(self, instance: InstanceId, keys: Sequence[bytes]) -> None:
        """The instance no longer holds the chunks ``keys`` (evicted)."""
        member = str(instance)
        names = [holders_key(self.prefix, self.namespace_hex, key.hex()) for key in keys]
        self.redis.batch("SREM", [(name, lambda p, k=name: p.srem(k, member)) for name in names])

    def leave(self, instance: InstanceId, keys: Sequence[bytes]) -> None:
        """A clean shutdown: the instance is dead at once, and out of the sets of ``keys``."""
        key = live_key(self.prefix, self.namespace_hex, instance)
        self.redis.batch("DEL", [(key, lambda p: p.delete(key))])
        self.withdraw(instance, keys)

    # ------------------------------------------------------------ lookups

    def lookup(
        self, questions: Sequence[tuple[bytes, ...]], exclude: InstanceId | None = None
    ) -> dict[bytes, PeerChunk | None]:
        """For each block boundary asked (each question is one chunk's worth of a prompt's block
        fingerprints, from a chunk boundary), the live-held chunk covering the most leading blocks
        of its question up to it, with every live holder but ``exclude``; or None."""
        fps = list(dict.fromkeys(fp for q in questions for fp in q))
        own = list(dict.fromkeys(q[-1] for q in questions))
        entry_names = [entry_key(self.prefix, self.namespace_hex, fp.hex()) for fp in fps]
        replies = self.redis.batch(
            "GET",
            [(name, lambda p, k=name: p.get(k)) for name in entry_names] + self._members_ops(own),
        )
        entries: dict[bytes, StoredChunk] = {}
        for fp, raw in zip(fps, replies[: len(fps)], strict=True):
            decoded = decode_block_entry(raw) if raw is not None else None
            if decoded is not None and fp.hex() in decoded[1]:  # anything else (planted, truncated) names nothing
                key, block_fps = decoded
                entries[fp] = StoredChunk(bytes.fromhex(key), tuple(bytes.fromhex(b) for b in block_fps))
        members = dict(zip(own, replies[len(fps) :], strict=True))
        # Per question, its candidates: the entry under a later boundary first (its chunk covers
        # more of the question), the question's own chunk last.
        found = [
            _distinct([entries[fp] for fp in reversed(q) if fp in entries] + [StoredChunk(q[-1], q)]) for q in questions
        ]
        more = list(dict.fromkeys(c.key for chunks in found for c in chunks if c.key not in members))
        if more:
            members.update(zip(more, self.redis.batch("SRANDMEMBER", self._members_ops(more)), strict=True))
        holders = self._live_holders(members, exclude)
        answers: dict[bytes, PeerChunk | None] = {}
        for question, chunks in zip(questions, found, strict=True):
            live = [PeerChunk(c, holders[c.key]) for c in chunks if holders.get(c.key)]
            for i, fp in enumerate(question):
                if answers.get(fp) is None:
                    answers[fp] = next(
                        (p for p in live if len(p.chunk.block_fps) > i and p.chunk.block_fps[i] == fp), None
                    )
        return answers

    def holders(self, key: bytes, exclude: InstanceId | None = None) -> tuple[InstanceId, ...]:
        """Every live holder of the chunk ``key`` (one SRANDMEMBER and the liveness checks)."""
        (raw,) = self.redis.batch("SRANDMEMBER", self._members_ops([key]))
        return self._live_holders({key: raw}, exclude).get(key, ())

    def ping(self) -> None:
        self.redis.ping()

    def close(self) -> None:
        self.redis.close()

    # ------------------------------------------------------------ pieces

    def _members_ops(self, keys: Sequence[bytes]) -> list[RedisOp]:
        names = [holders_key(self.prefix, self.namespace_hex, key.hex()) for key in keys]
        # SRANDMEMBER with a count: at most MAX_HOLDERS distinct members, however many were planted.
        return [(name, lambda p, k=name: p.srandmember(k, MAX_HOLDERS)) for name in names]

    def _live_holders(
        self, members: dict[bytes, Any], exclude: InstanceId | None
    ) -> dict[bytes, tuple[InstanceId, ...]]:
        """The live instances among each chunk's members. Members known dead, and members that
        are not instance ids, are removed from their sets."""
        parsed = {key: [(raw, InstanceId.parse(raw)) for raw in (found or ())] for key, found in members.items()}
        alive = self._liveness({i for pairs in parsed.values() for _, i in pairs if i is not None and i != exclude})
        holders: dict[bytes, tuple[InstanceId, ...]] = {}
        dead: list[tuple[str, Any]] = []
        for key, pairs in parsed.items():
            holders[key] = tuple(sorted((i for _, i in pairs if i is not None and alive.get(i)), key=str))
            name = holders_key(self.prefix, self.namespace_hex, key.hex())
            dead += [(name, raw) for raw, i in pairs if i is None or (i != exclude and alive.get(i) is False)]
        if dead:
            try:
                self.redis.batch("SREM", [(name, lambda p, k=name, m=raw: p.srem(k, m)) for name, raw in dead])
            except RemoteError:
                pass  # pruning is housekeeping: the lookup's answer stands
        return holders

    def _liveness(self, instances: set[InstanceId]) -> dict[InstanceId, bool | None]:
        """Whether each instance's liveness key exists (None: a cluster node that holds it failed)."""
        now = time.monotonic()
        known: dict[InstanceId, bool | None] = {}
        with self._lock:
            for instance in instances:
                seen = self._live.get(instance)
                if seen is not None and now - seen[1] < self.liveness_cache_s:
                    known[instance] = seen[0]
        unknown = [i for i in instances if i not in known]
        if not unknown:
            return known
        names = [live_key(self.prefix, self.namespace_hex, i) for i in unknown]
        replies = self.redis.batch("EXISTS", [(name, lambda p, k=name: p.exists(k)) for name in names])
        with self._lock:
            if len(self._live) > 10_000:  # instances come and go: never an unbounded memory
                self._live.clear()
            for instance, reply in zip(unknown, replies, strict=True):
                known[instance] = None if reply is None else bool(reply)
                if reply is not None:
                    self._live[instance] = (bool(reply), now)
        return known


def _distinct(chunks: list[StoredChunk]) -> list[StoredChunk]:
    seen: dict[bytes, StoredChunk] = {}
    for chunk in chunks:
        seen.setdefault(chunk.key, chunk)
    return list(seen.values())


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
