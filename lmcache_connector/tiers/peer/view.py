"""The scheduler side's local view of the registry: who holds which chunk, learned in the background.

The scheduler never waits on the network. :meth:`PeerView.best_piece` answers from what the view
knows; what it does not know yet is asked by a background thread (:meth:`.registry.PeerRegistry.lookup`:
a whole prompt in one question, at most three round trips), and until the answer arrives the answer
is :data:`~lmcache_connector.tiers.base.PENDING` (vLLM asks again later). It works as the remote
tier's :class:`~lmcache_connector.tiers.remote.catalog.RemoteCatalog` does, with holders (both are a
:class:`~lmcache_connector.tiers.lookup_cache.LookupCache`):

* **never blocking**: a fresh question may be waited for a few milliseconds (a registry on the
  same network answers within it, so a peer hit usually costs no extra step); a question not
  answered within ``lookup_timeout_s`` is a miss and marks the registry *down*: every lookup is
  then an immediate miss until a background ``PING`` succeeds (after 0.5 s, then at doubling
  intervals up to 30 s). One warning when it goes down, one when it is back;
* **allowed to be stale**: an answer is kept until it was used and is 2 s old (or 30 s unused),
  then asked again (peers come and go faster than a shared store changes), so chunks that peers
  store or evict become visible; a holder that turns out not to have the chunk is reported with :meth:`PeerView.forget`;
* **never itself**: the instance's own id is excluded from every answer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from lmcache_connector.tiers.base import _Pending
from lmcache_connector.tiers.lookup_cache import Answer, LookupCache, Question
from lmcache_connector.tiers.peer.addresses import InstanceId
from lmcache_connector.tiers.peer.registry import PeerChunk, PeerRegistry


class PeerView(LookupCache[PeerChunk]):
    """Scheduler-thread API: :meth:`poll`, :meth:`prefetch`, :meth:`best_piece`, :meth:`forget`, :meth:`up`."""

    answer_ttl_s = 2.0  # peers come and go faster than a shared store changes
    answer_max_age_s = 30.0
    thread_name = "lmcache-peer-view"
    while_down = "serving without peers"

    def __init__(
        self,
        registry: PeerRegistry,
        own: InstanceId | None,
        lookup_timeout_s: float = 0.1,
        start_up: bool = True,
    ):
        self.registry = registry
        self.own = own
        super().__init__(lookup_timeout_s, start_up)  # last: starts the background thread

    @property
    def service(self) -> str:
        return f"the P2P registry {self.registry.redis.url}"

    def best_piece(self, block_fps: Sequence[bytes]) -> tuple[PeerChunk, int] | _Pending | None:
        """The live-held chunk covering the most leading blocks of one chunk's ``block_fps``, and
        how many; PENDING while the registry has not answered yet; None for a miss."""
        if not self._up or not block_fps:
            return None
        return self._longest(block_fps)

    def forget(self, key: bytes, holder: InstanceId | None = None) -> None:
        """A fetch found the chunk missing at ``holder`` (at every holder, when None): drop it from
        the answers that name it, until they are asked again."""
        now = time.monotonic()
        for fp, answer in list(self._answers.items()):
            piece = answer.held
            if piece is None or piece.chunk.key != key:
                continue
            rest = tuple(h for h in piece.holders if holder is not None and h != holder)
            self._answers[fp] = Answer(PeerChunk(piece.chunk, rest) if rest else None, now)

    # ------------------------------------------------------------ LookupCache's

    def _late(self) -> None:
        # The registry is a small Redis answering small questions: one that does not answer in time
        # is taken as down (lookups are immediate misses until a ping answers, 0.5 s on).
        self._count("registry_failures")
        self._mark_down(f"no answer to a lookup within {self.lookup_timeout_s * 1000:.0f} ms")

    def _resolve(self, questions: list[Question]) -> dict[bytes, PeerChunk | None]:
        return self.registry.lookup(questions, exclude=self.own)

    def _ping(self) -> None:
        self.registry.ping()
