"""Counting what every worker rank reported about a job, until all of them have.

Each tensor-parallel / pipeline rank holds its own shard of a chunk, so a store, a fill (promotion)
or a disk write is finished only when *every* rank has reported its outcome. A job is never
resolved on the first failure: the other ranks may still be copying into, or writing from, the
same slot, and releasing it early would let a new chunk overwrite bytes a rank is still reading.

``report(job, ok, count)`` adds ``count`` rank reports; once ``world`` reports arrived it returns
the job's outcome (``True`` only when every rank succeeded) and forgets the job; before that it
returns ``None``. Reports for jobs the ledger was not told about (``expect``) are ignored.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass


@dataclass
class _Tally:
    reports: int = 0
    failed: bool = False


class ReportLedger:
    def __init__(self, world: int):
        self.world = max(1, world)
        self._tallies: dict[Hashable, _Tally] = {}

    def expect(self, job: Hashable) -> None:
        self._tallies.setdefault(job, _Tally())

    def report(self, job: Hashable, ok: bool, count: int = 1) -> bool | None:
        tally = self._tallies.get(job)
        if tally is None:
            return None
        tally.reports += count
        tally.failed |= not ok
        if tally.reports < self.world:
            return None
        del self._tallies[job]
        return not tally.failed

    def forget(self, job: Hashable) -> None:
        self._tallies.pop(job, None)

    def __contains__(self, job: Hashable) -> bool:
        return job in self._tallies

    def __len__(self) -> int:
        return len(self._tallies)

    def jobs(self) -> list[Hashable]:
        return list(self._tallies)
