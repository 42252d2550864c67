"""Keeping one instance's registry entries true, in the background: publish, withdraw, heartbeat.

A :class:`RegistryPublisher` belongs to the side that knows what the instance holds (the scheduler:
its memory index and disk catalog, in phase 2). :meth:`~RegistryPublisher.publish` and
:meth:`~RegistryPublisher.withdraw` return at once; a background thread sends them in batches
(one pipeline per :data:`BATCH_CHUNKS` chunks, a publish and a withdrawal of the same chunk in
between collapsing into the last), off every serving path. The same thread

* renews the instance's liveness key every live_ttl / 3, before its first publish, so a lookup
  never takes a fresh holder for a dead one;
* re-publishes everything held every holder_ttl / 2, and at once when it finds its liveness key
  had lapsed (a stall longer than live_ttl, a registry that restarted empty, an outage): what
  lookups pruned or the registry lost comes back by itself;
* when the registry fails: one warning, retries after 0.5 s doubling up to 30 s, keeps what is
  held and what is still to withdraw, and re-publishes everything when the registry answers again
  (one more warning line).

:meth:`~RegistryPublisher.close` leaves cleanly (liveness key deleted, the instance taken out of
every set it is in, within a bounded time); an instance that dies without closing vanishes from
lookups within live_ttl and from the registry within holder_ttl (:mod:`.registry`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from lmcache_connector.tiers.base import StoredChunk
from lmcache_connector.tiers.peer.addresses import InstanceId
from lmcache_connector.tiers.peer.registry import PeerRegistry
from lmcache_connector.tiers.remote.client import RemoteError

logger = logging.getLogger("lmcache_connector")

BATCH_CHUNKS = 256
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 30.0


class RegistryPublisher:
    def __init__(self, registry: PeerRegistry, instance: InstanceId):
        self.registry = registry
        self.instance = instance
        self._held: dict[bytes, tuple[bytes, ...]] = {}
        self._pending: dict[bytes, bool] = {}  # key -> True: publish, False: withdraw
        self._sending = False  # a batch taken from _pending is on its way
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._up = True
        self._counts: dict[str, float] = {}
        self._thread = threading.Thread(target=self._run, name="lmcache-peer-publisher", daemon=True)

    def start(self) -> RegistryPublisher:
        self._thread.start()
        return self

    # ------------------------------------------------------------ any thread

    def publish(self, key: bytes, block_fps: Sequence[bytes]) -> None:
        """The instance now holds the chunk (every rank has its bytes)."""
        with self._lock:
            self._held[key] = tuple(block_fps)
            self._pending[key] = True
        self._wake.set()

    def withdraw(self, key: bytes) -> None:
        """The instance no longer holds the chunk."""
        with self._lock:
            if self._held.pop(key, None) is None and key not in self._pending:
                return
            self._pending[key] = False
        self._wake.set()

    def held(self) -> int:
        with self._lock:
            return len(self._held)

    def up(self) -> bool:
        return self._up

    def take_counts(self) -> dict[str, float]:
        with self._lock:
            counts, self._counts = self._counts, {}
        return counts

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until nothing is left to send (tests, shutdown); whether that happened in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending and not self._sending and self._up:
                    return True
            self._wake.set()
            time.sleep(0.01)
        return False

    def close(self, timeout: float = 2.0, leave: bool = True) -> None:
        """Stop; with ``leave``, take the instance out of the registry first (best effort, bounded)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        if not leave:
            return
        with self._lock:
            keys = list(self._held)
        deadline = time.monotonic() + timeout
        try:
            self.registry.leave(self.instance, keys[:BATCH_CHUNKS])
            for start in range(BATCH_CHUNKS, len(keys), BATCH_CHUNKS):
                if time.monotonic() > deadline:
                    break  # the rest expires by itself: the liveness key is gone already
                self.registry.withdraw(self.instance, keys[start : start + BATCH_CHUNKS])
        except RemoteError as exc:
            logger.info("lmcache_connector: leaving the P2P registry failed (%s); its entries will expire", exc)

    # ------------------------------------------------------------ background thread

    def _run(self) -> None:
        live_every = self.registry.live_ttl_s / 3
        refresh_every = self.registry.holder_ttl_s / 2
        next_beat = 0.0
        next_refresh = time.monotonic() + refresh_every
        retry = RETRY_FIRST_S
        while not self._stop.is_set():
            self._wake.wait(max(0.0, min(next_beat, next_refresh) - time.monotonic()))
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if time.monotonic() >= next_beat or not self._up:
                    was_alive = self.registry.heartbeat(self.instance)
                    next_beat = time.monotonic() + live_every
                    if not was_alive or not self._up:
                        next_refresh = 0.0  # pruned or lost meanwhile: everything again
                if time.monotonic() >= next_refresh:
                    self._republish_all()
                    next_refresh = time.monotonic() + refresh_every
                self._send_pending()
            except RemoteError as exc:
                self._mark_down(str(exc))
                if self._stop.wait(retry):
                    return
                retry = min(retry * 2, RETRY_MAX_S)
                continue
            except Exception:  # a bug must not kill the thread: the entries would expire
                logger.exception("lmcache_connector: publishing to the P2P registry failed")
                self._stop.wait(retry)
                continue
            retry = RETRY_FIRST_S
            self._mark_up()

    def _republish_all(self) -> None:
        with self._lock:
            held = [StoredChunk(key, fps) for key, fps in self._held.items()]
            for chunk in held:  # sent now: not again as pending
                if self._pending.get(chunk.key) is True:
                    del self._pending[chunk.key]
        for start in range(0, len(held), BATCH_CHUNKS):
            self.registry.publish(self.instance, held[start : start + BATCH_CHUNKS])
        self._count("registry_published", len(held))

    def _send_pending(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    return
                batch = dict(list(self._pending.items())[:BATCH_CHUNKS])
                for key in batch:
                    del self._pending[key]
                chunks = [StoredChunk(k, self._held[k]) for k, add in batch.items() if add and k in self._held]
                self._sending = True
            gone = [key for key, add in batch.items() if not add]
            try:
                if chunks:
                    self.registry.publish(self.instance, chunks)
                if gone:
                    self.registry.withdraw(self.instance, gone)
            except RemoteError:
                with self._lock:  # not sent: again later, unless something newer was asked meanwhile
                    for key, add in batch.items():
                        self._pending.setdefault(key, add)
                raise
            finally:
                with self._lock:
                    self._sending = False
            self._count("registry_published", len(chunks))
            self._count("registry_withdrawn", len(gone))

    def _mark_down(self, reason: str) -> None:
        if self._up:
            logger.warning(
                "lmcache_connector: the P2P registry %s is down (%s); peers will not find this instance's "
                "chunks until it is back (retrying in the background)",
                self.registry.redis.url,
                reason,
            )
        self._up = False

    def _mark_up(self) -> None:
        if not self._up:
            logger.warning("lmcache_connector: the P2P registry %s is back", self.registry.redis.url)
        self._up = True

    def _count(self, key: str, amount: float) -> None:
        if amount:
            with self._lock:
                self._counts[key] = self._counts.get(key, 0) + amount
