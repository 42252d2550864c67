"""Empty engine steps while the workers still owe reports, so nothing waits for the next request.

vLLM steps its engine only while it has requests. What the workers finish after a request's last
step (a chunk's file landing on disk, a value reaching Redis, ...) is reported with the output of
the next step; with no next request, the report waits: the disk and remote catalogs do not know
the chunk (no hit from them, no KV-cache event for routers), its memory slot stays pinned for the
write, and ``/metrics`` lags behind what was stored. vLLM's serving loop asks
``has_pending_push_work`` only when no request is left, and steps on (empty steps, which carry the
workers' reports) while the answer is True. :class:`IdleSteps` gives that answer:

* True while reports are owed, with a pause before each empty step, spent in vLLM's loop, which
  has nothing else to do: ``pause_s`` after progress, doubling up to ``max_pause_s`` while none is
  made (a slow store's write-behind does not keep a core busy with empty steps). A request
  arriving meanwhile waits at most one pause.
* False once the owed reports made no progress for ``give_up_s`` (a write that its tier keeps
  retrying, a worker that lost track of a job): the engine then idles as before, and the next
  request's steps carry whatever arrives later. Any progress, or a new idle period, starts over.

vLLM's offline ``LLM`` class steps only while its own requests run and never asks; there the next
request carries the reports, as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

logger = logging.getLogger("lmcache_connector")

NEW_IDLE_PERIOD_S = 1.0  # no question for this long: the engine served requests or slept meanwhile


class IdleSteps:
    def __init__(
        self,
        pause_s: float = 0.002,
        max_pause_s: float = 0.02,
        give_up_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.pause_s = pause_s
        self.max_pause_s = max_pause_s
        self.give_up_s = give_up_s
        self._clock = clock
        self._sleep = sleep
        self._owed = 0
        self._progress_at = 0.0
        self._pause = pause_s
        self._asked_at = float("-inf")
        self._gave_up = False

    def wanted(self, owed: int) -> bool:
        """Whether vLLM should run an empty step now, with ``owed`` reports outstanding."""
        now = self._clock()
        new_period = now - self._asked_at > NEW_IDLE_PERIOD_S
        self._asked_at = now
        if owed <= 0:
            self._owed = 0
            return False
        if new_period or owed != self._owed:
            self._owed, self._progress_at, self._gave_up, self._pause = owed, now, False, self.pause_s
        if now - self._progress_at > self.give_up_s:
            if not self._gave_up:
                self._gave_up = True
                logger.info(
                    "lmcache_connector: %d background job(s) unreported for %.0f s with no request running; "
                    "their reports will come with the next request",
                    owed,
                    self.give_up_s,
                )
            return False
        self._sleep(self._pause)
        self._pause = min(2 * self._pause, self.max_pause_s)
        return True
