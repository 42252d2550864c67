"""The disk writer's least-recently-used order of the chunk files it knows. Bookkeeping only, no I/O.

A :class:`FileLRU` holds ``name -> (mtime, size)`` for the chunk files one writer knows of (those
it wrote, and those its last listing of the folder found), and their byte total. Recency is the
files' modification time, the same order every process sharing the folder uses (the catalog
touches a file on every hit). The order may be stale: a file touched or removed by another process
keeps its old place here until the writer looks at it, so the writer checks each candidate on disk
before deleting it and tells the LRU what it found (:meth:`FileLRU.add` a newer mtime,
:meth:`FileLRU.discard` a vanished file).

* :meth:`oldest` is the file with the oldest known mtime (``None`` when empty); ``add``, ``discard``
  and ``oldest`` cost O(log n).
* :meth:`reset` replaces what is known with a listing of the folder.
* ``bytes`` is the total size of the known files: what evicting all of them would free at most.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable


class FileLRU:
    def __init__(self) -> None:
        self._files: dict[str, tuple[float, int]] = {}
        self._heap: list[tuple[float, str]] = []  # may hold outdated (mtime, name) items: skipped by oldest()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def add(self, name: str, mtime: float, size: int) -> None:
        """Know a file (again): written just now, or found younger (touched) or resized on disk."""
        self.discard(name)
        self._files[name] = (mtime, size)
        self.bytes += size
        heapq.heappush(self._heap, (mtime, name))
        if len(self._heap) > 2 * len(self._files) + 1024:
            self._heap = [(mtime, name) for name, (mtime, _) in self._files.items()]
            heapq.heapify(self._heap)

    def discard(self, name: str) -> int:
        """Forget a file (evicted, or gone); its known size, 0 if it was not known."""
        known = self._files.pop(name, None)
        if known is None:
            return 0
        self.bytes -= known[1]
        return known[1]

    def oldest(self) -> tuple[str, float, int] | None:
        """``(name, mtime, size)`` of the file with the oldest known mtime, or ``None``."""
        while self._heap:
            mtime, name = self._heap[0]
            known = self._files.get(name)
            if known is not None and known[0] == mtime:
                return name, mtime, known[1]
            heapq.heappop(self._heap)  # outdated: the file was forgotten or re-added since
        return None

    def reset(self, files: Iterable[tuple[float, int, str]]) -> None:
        """Know exactly ``(mtime, size, name)`` of each file listed, and nothing else."""
        self._files = {name: (mtime, size) for mtime, size, name in files}
        self._heap = [(mtime, name) for name, (mtime, _) in self._files.items()]
        heapq.heapify(self._heap)
        self.bytes = sum(size for _, size in self._files.values())
