"""What a network service said about block boundaries, asked in the background: the machinery the
remote tier's catalog (:mod:`.remote.catalog`) and the peer tier's registry view (:mod:`.peer.view`)
share.

A :class:`LookupCache` keeps, per block fingerprint, what the service last said holds that block
boundary (or None: nothing does), and the questions in flight with their deadlines. Its promises,
which both users make to the scheduler:

* **never blocking**: the scheduler thread only reads answers and queues questions; one background
  thread asks the service, everything queued so far in one call (the subclass's :meth:`_resolve`).
  A freshly asked question may be waited for :attr:`LookupCache.answer_wait_s` (a service on the same
  machine or network answers within it, so a hit usually costs no extra scheduler step); until it
  is answered a lookup is :data:`~lmcache_connector.tiers.base.PENDING`, and past
  ``lookup_timeout_s`` it is late: a miss, and what else that means is the subclass's (:meth:`_late`);
* **down and back**: a background call that fails (:class:`~.remote.client.RemoteError`: refused,
  dropped, or no answer within the client's socket timeout) marks the service *down*: every lookup
  is then an immediate miss until a background ping succeeds (after :attr:`~LookupCache.probe_first_s`,
  then at doubling intervals up to :attr:`~LookupCache.probe_max_s`). One warning when it goes down,
  one when it is back; never a permanent disable. Questions asked before an outage are dropped
  (their deadlines are long past);
* **allowed to be stale**: an answer is kept until it was used and is ``answer_ttl_s`` old (or
  ``answer_max_age_s`` unused), then asked again, so what the service learns later becomes visible;
  a stale answer is a miss at read time, which the caller reports back so it is not planned again.

Subclasses name the service for logs (:attr:`service`, :attr:`while_down`), answer questions
(:meth:`_resolve`) and pings (:meth:`_ping`) in the background, and may queue work of their own
(:meth:`_handle_other`), do periodic work (:meth:`_tick`) and apply results of their own
(:meth:`_on_result`). A subclass calls ``LookupCache.__init__`` last: it starts the thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from lmcache_connector.tiers.base import PENDING, _Pending
from lmcache_connector.tiers.remote.client import RemoteError

logger = logging.getLogger("lmcache_connector")

Held = TypeVar("Held")  # what the service says holds a block boundary (a chunk, or a chunk and its holders)
Question = tuple[bytes, ...]  # one chunk's worth of a prompt's block fingerprints, from a chunk boundary


@dataclass
class Answer(Generic[Held]):
    held: Held | None  # what holds this block boundary, or None: nothing does
    at: float
    used: bool = False


class LookupCache(ABC, Generic[Held]):
    answer_ttl_s = 5.0  # a used answer is asked again after this long
    answer_max_age_s = 60.0  # an answer nobody used is dropped after this long
    answer_wait_s = 0.003  # the longest a lookup waits for an answer it just asked for
    probe_first_s = 0.5
    probe_max_s = 30.0
    thread_name = "lmcache-lookups"
    while_down = "serving from the other tiers"  # what the instance does while the service is down

    def __init__(self, lookup_timeout_s: float, start_up: bool = True):
        self.lookup_timeout_s = lookup_timeout_s
        self._answers: dict[bytes, Answer[Held]] = {}
        self._asked: dict[bytes, float] = {}  # block fingerprint -> deadline of its question
        self._up = start_up
        self._counts: dict[str, float] = {}
        self._next_expiry = 0.0
        # Scheduler thread -> background thread: ("ask", questions), ("stop", None), or the subclass's work.
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        # Background thread -> scheduler thread, (kind, payload), applied in poll().
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._answered = threading.Event()
        self._down = threading.Event()  # marked down: probe before asking again
        if not start_up:
            self._down.set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    @property
    @abstractmethod
    def service(self) -> str:
        """The service, as warnings name it (``the remote tier redis://…``)."""

    # ------------------------------------------------------------ scheduler thread

    def poll(self) -> None:
        while True:
            try:
                kind, payload = self._results.get_nowait()
            except queue.Empty:
                break
            if kind == "answers":
                self._apply(payload)
            elif kind == "down":
                self._mark_down(payload)
            elif kind == "up":
                self._mark_up()
            else:
                self._on_result(kind, payload)
        now = time.monotonic()
        if now >= self._next_expiry:
            self._expire(now)
            self._next_expiry = now + 1.0

    def prefetch(self, block_fps: Sequence[bytes], blocks_per_chunk: int) -> None:
        """Ask about every chunk of a prompt at once (one question to the service, not one per chunk)."""
        if not self._up:
            return
        questions = [
            tuple(block_fps[start : start + blocks_per_chunk]) for start in range(0, len(block_fps), blocks_per_chunk)
        ]
        questions = [q for q in questions if not self._known_without_asking(q)]
        if self._ask([q for q in questions if any(fp not in self._answers for fp in q)]):
            self._wait_briefly()

    def up(self) -> bool:
        return self._up

    def take_counts(self) -> dict[str, float]:
        counts, self._counts = self._counts, {}
        return counts

    def close(self) -> None:
        self._stop.set()
        self._work.put(("stop", None))
        self._thread.join(timeout=5)

    # ------------------------------------------------------------ scheduler-thread pieces

    def _longest(self, block_fps: Sequence[bytes]) -> tuple[Held, int] | _Pending | None:
        """What holds the most leading blocks of one chunk's ``block_fps``, and how many; PENDING
        while the service has not answered; None for a miss (a late answer is one)."""
        unknown = [fp for fp in block_fps if fp not in self._answers]
        if unknown and self._ask([tuple(block_fps)]):
            self._wait_briefly()
            unknown = [fp for fp in block_fps if fp not in self._answers]
        if unknown:
            if time.monotonic() > min(self._asked[fp] for fp in unknown):
                self._late()
                return None
            return PENDING
        best = None
        for n in range(len(block_fps), 0, -1):
            answer = self._answers[block_fps[n - 1]]
            answer.used = True
            if best is None and answer.held is not None:
                best = (answer.held, n)
        return best

    def _ask(self, questions: list[Question]) -> bool:
        """Queue the questions not already in flight; whether anything was queued."""
        deadline = time.monotonic() + self.lookup_timeout_s
        fresh = [q for q in questions if any(fp not in self._asked and fp not in self._answers for fp in q)]
        for question in fresh:
            for fp in question:
                if fp not in self._answers:
                    self._asked.setdefault(fp, deadline)
        if fresh:
            self._answered.clear()
            self._work.put(("ask", fresh))
        return bool(fresh)

    def _wait_briefly(self) -> None:
        if self._answered.wait(min(self.answer_wait_s, self.lookup_timeout_s)):
            self.poll()

    def _apply(self, answers: dict[bytes, Held | None]) -> None:
        now = time.monotonic()
        for fp, held in answers.items():
            self._asked.pop(fp, None)
            self._answers[fp] = Answer(self._keep(held), now)

    def _expire(self, now: float) -> None:
        stale = [
            fp
            for fp, a in self._answers.items()
            if (a.used and now - a.at > self.answer_ttl_s) or now - a.at > self.answer_max_age_s
        ]
        for fp in stale:
            del self._answers[fp]
        for fp in [fp for fp, deadline in self._asked.items() if now - deadline > self.answer_max_age_s]:
            del self._asked[fp]  # a question never answered (the service went down meanwhile)
        self._expired()

    def _mark_down(self, reason: str) -> None:
        if self._up:
            logger.warning(
                "lmcache_connector: %s is down (%s); %s and retrying in the background",
                self.service,
                reason,
                self.while_down,
            )
        self._up = False
        self._asked.clear()
        self._down.set()

    def _mark_up(self) -> None:
        if not self._up:
            logger.warning("lmcache_connector: %s is back", self.service)
        self._up = True

    def _count(self, name: str) -> None:
        self._counts[name] = self._counts.get(name, 0) + 1

    # ------------------------------------------------------------ the subclass's, scheduler thread

    def _late(self) -> None:
        """A lookup's question passed its deadline unanswered (the lookup is a miss)."""

    def _known_without_asking(self, question: Question) -> bool:
        """Whether ``question`` is answered without asking the service (answering it now if so)."""
        return False

    def _keep(self, held: Held | None) -> Held | None:
        """The object to keep for an answer (a subclass may share one per chunk)."""
        return held

    def _expired(self) -> None:
        """After stale answers were dropped."""

    def _on_result(self, kind: str, payload: Any) -> None:
        """A result of the subclass's own background work."""

    # ------------------------------------------------------------ background thread

    def _run(self) -> None:
        probe_wait = self.probe_first_s
        while not self._stop.is_set():
            if self._down.is_set():
                if self._stop.wait(probe_wait):
                    return
                try:
                    self._ping()
                except RemoteError:
                    probe_wait = min(probe_wait * 2, self.probe_max_s)
                    continue
                probe_wait = self.probe_first_s
                self._down.clear()
                self._drop_questions()
                self._results.put(("up", None))
                continue
            try:
                item = self._work.get(timeout=0.5)
            except queue.Empty:
                item = None
            try:
                if item is not None:
                    self._handle(item)
                self._tick()
            except RemoteError as exc:
                self._down.set()
                self._results.put(("down", str(exc)))
            except Exception:  # a bug here must not kill the thread: the service would never be asked again
                logger.exception("lmcache_connector: background work for %s failed", self.service)

    def _handle(self, item: tuple[str, Any]) -> None:
        kind, payload = item
        if kind == "stop":
            return
        if kind != "ask":
            self._handle_other(kind, payload)
            return
        questions = list(payload)
        while True:  # everything asked so far, in one call
            try:
                more = self._work.get_nowait()
            except queue.Empty:
                break
            if more[0] == "ask":
                questions.extend(more[1])
            else:
                self._handle(more)
        self._results.put(("answers", self._resolve(questions)))
        self._answered.set()

    def _drop_questions(self) -> None:
        kept = []
        while True:
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                break
            if item[0] != "ask":
                kept.append(item)
        for item in kept:
            self._work.put(item)

    # ------------------------------------------------------------ the subclass's, background thread

    @abstractmethod
    def _resolve(self, questions: list[Question]) -> dict[bytes, Held | None]:
        """What holds each asked block boundary (None: nothing), from the service; RemoteError when
        the service cannot be asked."""

    @abstractmethod
    def _ping(self) -> None:
        """Raise RemoteError unless the service answers."""

    def _handle_other(self, kind: str, payload: Any) -> None:
        """Work the subclass queued on ``self._work`` as ``(kind, payload)``."""

    def _tick(self) -> None:
        """Periodic work, after each item of work or half a second without one."""
