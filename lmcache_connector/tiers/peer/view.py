"""The scheduler side's local view of the registry: who holds which chunk, learned in the background.

The scheduler never waits on the network. :meth:`PeerView.best_piece` answers from what the view
knows; what it does not know yet is asked by a background thread (:meth:`.registry.PeerRegistry.lookup`:
a whole prompt in one question, at most three round trips), and until the answer arrives the answer
is :data:`~lmcache_connector.tiers.base.PENDING` (vLLM asks again later). It works as the remote
tier's :class:`~lmcache_connector.tiers.remote.catalog.RemoteCatalog` does, with holders:

* **never blocking**: a fresh question may be waited for :data:`ANSWER_WAIT_S` (a registry on the
  same network answers within it, so a peer hit usually costs no extra step); a question not
  answered within ``lookup_timeout_s`` is a miss and marks the registry *down*: every lookup is
  then an immediate miss until a background ``PING`` succeeds (after 0.5 s, then at doubling
  intervals up to 30 s). One warning when it goes down, one when it is back;
* **allowed to be stale**: an answer is kept until it was used and is :data:`ANSWER_TTL_S` old (or
  :data:`ANSWER_MAX_AGE_S` unused), then asked again, so chunks that peers store or evict become
  visible; a holder that turns out not to have the chunk is reported with :meth:`PeerView.forget`;
* **never itself**: the instance's own id is excluded from every answer.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from lmcache_connector.tiers.base import PENDING, _Pending
from lmcache_connector.tiers.peer.addresses import InstanceId
from lmcache_connector.tiers.peer.registry import PeerChunk, PeerRegistry
from lmcache_connector.tiers.remote.client import RemoteError

logger = logging.getLogger("lmcache_connector")

ANSWER_TTL_S = 2.0  # peers come and go faster than a shared store changes
ANSWER_MAX_AGE_S = 30.0
ANSWER_WAIT_S = 0.003
PROBE_FIRST_S = 0.5
PROBE_MAX_S = 30.0


@dataclass
class _Answer:
    piece: PeerChunk | None  # the live-held chunk holding this block boundary, or None
    at: float
    used: bool = False


class PeerView:
    """Scheduler-thread API: :meth:`poll`, :meth:`prefetch`, :meth:`best_piece`, :meth:`forget`, :meth:`up`."""

    def __init__(
        self,
        registry: PeerRegistry,
        own: InstanceId | None,
        lookup_timeout_s: float = 0.1,
        start_up: bool = True,
    ):
        self.registry = registry
        self.own = own
        self.lookup_timeout_s = lookup_timeout_s
        self._answers: dict[bytes, _Answer] = {}
        self._asked: dict[bytes, float] = {}  # block fingerprint -> deadline of its question
        self._up = start_up
        self._counts: dict[str, float] = {}
        self._next_expiry = 0.0
        self._questions: queue.SimpleQueue = queue.SimpleQueue()  # scheduler -> background
        self._results: queue.SimpleQueue = queue.SimpleQueue()  # background -> scheduler, taken in poll()
        self._answered = threading.Event()
        self._down = threading.Event()
        if not start_up:
            self._down.set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmcache-peer-view", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ scheduler thread

    def poll(self) -> None:
        while True:
            try:
                kind, payload = self._results.get_nowait()
            except queue.Empty:
                break
            if kind == "answers":
                now = time.monotonic()
                for fp, piece in payload.items():
                    self._asked.pop(fp, None)
                    self._answers[fp] = _Answer(piece, now)
            elif kind == "down":
                self._mark_down(payload)
            elif kind == "up":
                self._mark_up()
        now = time.monotonic()
        if now >= self._next_expiry:
            self._expire(now)
            self._next_expiry = now + 1.0

    def prefetch(self, block_fps: Sequence[bytes], blocks_per_chunk: int) -> None:
        """Ask about every chunk of a prompt at once."""
        if not self._up:
            return
        questions = [tuple(block_fps[i : i + blocks_per_chunk]) for i in range(0, len(block_fps), blocks_per_chunk)]
        if self._ask([q for q in questions if any(fp not in self._answers for fp in q)]):
            self._wait_briefly()

    def best_piece(self, block_fps: Sequence[bytes]) -> tuple[PeerChunk, int] | _Pending | None:
        """The live-held chunk covering the most leading blocks of one chunk's ``block_fps``, and
        how many; PENDING while the registry has not answered yet; None for a miss."""
        if not self._up or not block_fps:
            return None
        unknown = [fp for fp in block_fps if fp not in self._answers]
        if unknown and self._ask([tuple(block_fps)]):
            self._wait_briefly()
            unknown = [fp for fp in block_fps if fp not in self._answers]
        if unknown:
            if time.monotonic() > min(self._asked[fp] for fp in unknown):
                self._counts["registry_failures"] = self._counts.get("registry_failures", 0) + 1
                self._mark_down(f"no answer to a lookup within {self.lookup_timeout_s * 1000:.0f} ms")
                return None
            return PENDING
        best = None
        for n in range(len(block_fps), 0, -1):
            answer = self._answers[block_fps[n - 1]]
            answer.used = True
            if best is None and answer.piece is not None:
                best = (answer.piece, n)
        return best

    def forget(self, key: bytes, holder: InstanceId | None = None) -> None:
        """A fetch found the chunk missing at ``holder`` (at every holder, when None): drop it from
        the answers that name it, until they are asked again."""
        now = time.monotonic()
        for fp, answer in list(self._answers.items()):
            piece = answer.piece
            if piece is None or piece.chunk.key != key:
                continue
            rest = tuple(h for h in piece.holders if holder is not None and h != holder)
            self._answers[fp] = _Answer(PeerChunk(piece.chunk, rest) if rest else None, now)

    def up(self) -> bool:
        return self._up

    def take_counts(self) -> dict[str, float]:
        counts, self._counts = self._counts, {}
        return counts

    def close(self) -> None:
        self._stop.set()
        self._questions.put(None)
        self._thread.join(timeout=5)

    # ------------------------------------------------------------ scheduler-thread pieces

    def _ask(self, questions: list[tuple[bytes, ...]]) -> bool:
        deadline = time.monotonic() + self.lookup_timeout_s
        fresh = [q for q in questions if any(fp not in self._asked and fp not in self._answers for fp in q)]
        for question in fresh:
            for fp in question:
                if fp not in self._answers:
                    self._asked.setdefault(fp, deadline)
        if fresh:
            self._answered.clear()
            self._questions.put(fresh)
        return bool(fresh)

    def _wait_briefly(self) -> None:
        if self._answered.wait(min(ANSWER_WAIT_S, self.lookup_timeout_s)):
            self.poll()

    def _expire(self, now: float) -> None:
        stale = [
            fp
            for fp, a in self._answers.items()
            if (a.used and now - a.at > ANSWER_TTL_S) or now - a.at > ANSWER_MAX_AGE_S
        ]
        for fp in stale:
            del self._answers[fp]
        for fp in [fp for fp, deadline in self._asked.items() if now - deadline > ANSWER_MAX_AGE_S]:
            del self._asked[fp]

    def _mark_down(self, reason: str) -> None:
        if self._up:
            logger.warning(
                "lmcache_connector: the P2P registry %s is down (%s); serving without peers and retrying "
                "in the background",
                self.registry.redis.url,
                reason,
            )
        self._up = False
        self._asked.clear()
        self._down.set()

    def _mark_up(self) -> None:
        if not self._up:
            logger.warning("lmcache_connector: the P2P registry %s is back", self.registry.redis.url)
        self._up = True

    # ------------------------------------------------------------ background thread

    def _run(self) -> None:
        probe_wait = PROBE_FIRST_S
        while not self._stop.is_set():
            if self._down.is_set():
                if self._stop.wait(probe_wait):
                    return
                try:
                    self.registry.ping()
                except RemoteError:
                    probe_wait = min(probe_wait * 2, PROBE_MAX_S)
                    continue
                probe_wait = PROBE_FIRST_S
                self._down.clear()
                self._drain()  # asked before the outage: their deadlines are long past
                self._results.put(("up", None))
                continue
            try:
                questions = self._questions.get(timeout=0.5)
            except queue.Empty:
                continue
            if questions is None:
                return
            questions = list(questions)
            while True:  # everything asked so far, in one lookup
                try:
                    more = self._questions.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    return
                questions.extend(more)
            try:
                answers = self.registry.lookup(questions, exclude=self.own)
            except RemoteError as exc:
                self._down.set()
                self._results.put(("down", str(exc)))
                continue
            except Exception:  # a bug here must not kill the thread: the view would never answer again
                logger.exception("lmcache_connector: a P2P registry lookup failed")
                continue
            self._results.put(("answers", answers))
            self._answered.set()

    def _drain(self) -> None:
        while True:
            try:
                if self._questions.get_nowait() is None:
                    self._stop.set()
            except queue.Empty:
                return
