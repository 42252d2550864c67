"""The disk tier's bytes, worker side: background writes of memory slots to chunk files, and reads.

* ``submit_write`` queues a slot for writing; a background thread writes it (checksum, temporary
  file, rename) while the forward pass goes on. The slot must stay untouched until the write is
  reported (the scheduler keeps the chunk pinned meanwhile).
* The size bound holds for every process sharing the folder (ranks, engines). Each write takes an
  exclusive lock on ``.lmc.lock``, and the lock file holds the folder's usage as its last holder
  left it: every file of this library in the folder (every namespace and engine, temporary files
  included). The writer adds the file it reserves (at its full size, before writing it) and
  subtracts what it evicts and the file its rename replaced, so no writer relies on a figure of its
  own that others have moved on from; the finished file is renamed into place under the lock too,
  so a listing never misses it.
* Eviction without listing the folder. Each writer keeps an LRU (:mod:`.lru`) of the chunk files it
  knows — those it wrote, and every chunk file (any engine's) its last listing found — with their
  byte total. When a new file would not fit, the oldest known files are deleted in one batch until
  the folder is down to ``LOW_WATER`` of its bound with the new file, so the next writes fit without
  evicting. Each candidate is looked at first (one ``stat``): a file touched since the writer last
  saw it (the catalog refreshes a file's mtime on every hit, from the scheduler process) takes its
  new place in the order and stays; a file that is gone (another engine evicted it, a cache reset
  removed it) is forgotten. Files that evicting frees count only if this writer removed them.
* The folder is listed (every file stat'ed, under the lock) only when the figure is missing, when
  it was measured more than ``USAGE_MEASURE_S`` ago (once for all writers), and before an eviction
  if this writer's own listing is that old or the files it knows cannot make room (the folder is
  full of files written by others since it last looked): other engines' files enter the LRU
  through these listings. Files removed outside the lock (a corrupt file found by a read, the
  catalog's deletions and reset, ``lmcache-connector disk clear``) only make the figure too high,
  which costs an early eviction until the next listing, never an overshoot.
* ``read_into`` reads a chunk file into a slot and verifies its header and checksum; a corrupt or
  truncated file is deleted and reported, a missing one (evicted by another engine) is a miss.
* Failures, by errno. A full disk or quota (ENOSPC, EDQUOT) is transient: the write is dropped (a
  future miss), one warning is logged, writes are dropped without trying for ``DISK_FULL_RETRY_S``
  and then tried again; one line says when they resume. A read-only filesystem or a folder this
  process may not write (EROFS, EACCES, EPERM), or a file-size limit below a chunk's size (EFBIG:
  ``RLIMIT_FSIZE`` or the filesystem's largest file, which every later chunk would hit too), stops
  writes for the life of the process, with one warning. Any other error fails that write only.
  Loads of chunks on disk and the memory tier go on in every case.
* ``flush`` waits until every write submitted before it was called is done, for at most a bounded
  time (at shutdown, and at interpreter exit); ``close`` flushes, then stops the writer.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import errno
import fcntl
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from lmcache_connector.tiers.disk.folder import (
    PendingWrite,
    abandon,
    fill,
    publish,
    remove,
    remove_quietly,
    reserve_temp,
)
from lmcache_connector.tiers.disk.format import (
    LOCK_NAME,
    SUFFIX,
    TMP_SUFFIX,
    ChunkFileError,
    ChunkHeader,
    ForeignChunkError,
    MissingChunkError,
    checksum,
    encode_header,
    parse_file_name,
    read_chunk_into,
)
from lmcache_connector.tiers.disk.lru import FileLRU

logger = logging.getLogger("lmcache_connector")

USAGE_MEASURE_S = 30.0  # the folder is listed again when the shared figure (or this writer's view) is older
LOW_WATER = 0.9  # an eviction frees room down to this share of the bound, so the next writes need none
DISK_FULL_RETRY_S = 5.0  # after ENOSPC/EDQUOT, writes are dropped untried for this long
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
STOPS_WRITES_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})

# The usage figure in the lock file: fixed width, so it is rewritten in place.
_RECORD = "lmcache_connector disk usage v1: {usage:020d} bytes, measured at {measured_at:020.6f}\n"
_RECORD_RE = re.compile(rb"^lmcache_connector disk usage v1: (\d{20}) bytes, measured at ([0-9. ]{20})\n$")
RECORD_BYTES = len(_RECORD.format(usage=0, measured_at=0.0))


@dataclass
class WriteJob:
    store_id: int
    header: ChunkHeader
    regions: Sequence[memoryview]


@dataclass
class WriteResult:
    store_id: int
    ok: bool
    nbytes: int = 0  # KV bytes written (the file adds a header of under a KiB)
    seconds: float = 0.0


class DiskTier:
    def __init__(self, folder: str, max_bytes: int, namespace_hex: str, rank: str, fsync: bool = True):
        self.folder = folder
        self.max_bytes = max_bytes
        self.namespace_hex = namespace_hex
        self.rank = rank
        self.fsync = fsync
        self.disabled_reason: str | None = None
        self._jobs: queue.Queue[WriteJob | None] = queue.Queue()
        self._results: collections.deque[WriteResult] = collections.deque()
        self._evicted: collections.deque[bytes] = collections.deque()  # keys of ours another rank may still hold
        # Writes submitted and finished (written, dropped or failed): flush waits for the difference.
        self._progress = threading.Condition()
        self._submitted = 0
        self._finished = 0
        self._closed = False
        self._stopping = False  # after close: jobs still queued are dropped, not written
        self._retry_at = 0.0  # monotonic time before which writes are dropped (the disk was full)
        self._full_since: float | None = None
        self._dropped_while_full = 0
        self._lock_fd = -1
        # Only the writer thread uses these: the chunk files this writer knows, and when it last listed them.
        self._lru = FileLRU()
        self._listed_at = -float("inf")  # time.monotonic()
        try:
            self._open_folder()
        except OSError as exc:
            if exc.errno not in DISK_FULL_ERRNOS:  # a full disk is retried by the first write
                self._disable(exc)
        self._thread = threading.Thread(target=self._run, name="lmcache-disk-writer", daemon=True)
        self._thread.start()
        atexit.register(self.flush)

    def _open_folder(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.folder, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)

    def path(self, key_hex: str) -> str:
        return os.path.join(self.folder, f"{self.namespace_hex[:16]}-{self.rank}-{key_hex}{SUFFIX}")

    # ------------------------------------------------------------ writes

    def submit_write(self, store_id: int, header: ChunkHeader, regions: Sequence[memoryview]) -> None:
        with self._progress:
            if self.disabled_reason is None and not self._closed:
                self._submitted += 1
                self._jobs.put(WriteJob(store_id, header, regions))
                return
        self._results.append(WriteResult(store_id, ok=False))

    def take_results(self) -> tuple[list[WriteResult], list[bytes]]:
        """Writes finished since the last call, and keys of our chunks deleted to make room."""
        results = [self._results.popleft() for _ in range(len(self._results))]
        evicted = [self._evicted.popleft() for _ in range(len(self._evicted))]
        return results, evicted

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                if self._lock_fd >= 0:
                    os.close(self._lock_fd)
                return
            result = WriteResult(job.store_id, ok=False)
            try:
                result = self._attempt(job)
            except Exception:
                logger.exception("Writing chunk %s to disk failed", job.header.key[:12])
            finally:
                self._results.append(result)
                with self._progress:
                    self._finished += 1
                    self._progress.notify_all()

    def _attempt(self, job: WriteJob) -> WriteResult:
        failed = WriteResult(job.store_id, ok=False)
        if self._stopping or self.disabled_reason is not None:
            return failed
        if time.monotonic() < self._retry_at:
            self._dropped_while_full += 1
            return failed
        started = time.perf_counter()
        try:
            size = self.write_job(job)
        except OSError as exc:
            self._on_error(job, exc)
            return failed
        if size and self._full_since is not None:
            logger.info(
                "lmcache_connector: disk tier writes resumed after %.0f s (%d chunk writes dropped while %s was full)",
                time.monotonic() - self._full_since,
                self._dropped_while_full,
                self.folder,
            )
            self._full_since = None
        if not size:
            return failed
        return WriteResult(job.store_id, True, job.header.nbytes, time.perf_counter() - started)

    def _on_error(self, job: WriteJob, exc: OSError) -> None:
        if exc.errno in DISK_FULL_ERRNOS:
            now = time.monotonic()
            self._retry_at = now + DISK_FULL_RETRY_S
            if self._full_since is None:
                self._full_since = now
                self._dropped_while_full = 1
                logger.warning(
                    "lmcache_connector: disk tier folder %s is full (%s): chunk writes are dropped and tried "
                    "again every %.0f s. Serving, loads of chunks on disk and the memory tier go on.",
                    self.folder,
                    exc.strerror or exc,
                    DISK_FULL_RETRY_S,
                )
            else:
                self._dropped_while_full += 1
        elif exc.errno in STOPS_WRITES_ERRNOS:
            self._disable(exc)
        else:
            logger.warning("Writing chunk %s to disk failed: %s", job.header.key[:12], exc)

    def write_job(self, job: WriteJob) -> int:
        """Write one chunk file within the folder's bound, on the calling thread (the background
        writer's; tests wrap it to delay or inspect writes); its size, or 0 when it cannot fit."""
        header = replace(job.header, checksum=checksum(job.regions))
        encoded = encode_header(header)
        size = len(encoded) + header.nbytes
        if size + RECORD_BYTES > self.max_bytes:
            return 0
        if self._lock_fd < 0:
            self._open_folder()
        with self._folder_lock():
            usage, measured_at = self._make_room(size)
            if usage + size > self.max_bytes:
                return 0
            pending = reserve_temp(self.folder, header, size)
            self._store_usage(usage + size, measured_at)
        try:
            fill(pending, encoded, job.regions, self.fsync)
            with self._folder_lock():  # a listing in progress would miss a file renamed under it
                self._publish(pending)
        except BaseException:
            self._abandon(pending, size)
            raise
        self._lru.add(header.file_name, time.time(), size)  # at or after its mtime: a later touch shows
        return size

    def _publish(self, pending: PendingWrite) -> None:
        """With the lock held: rename into place; a file of the same name it replaces leaves the figure."""
        try:
            replaced = os.stat(pending.final).st_size
        except FileNotFoundError:
            replaced = 0
        publish(pending)
        if replaced:
            record = self._load_usage()
            if record is not None:
                self._store_usage(max(0, record[0] - replaced), record[1])

    def _abandon(self, pending: PendingWrite, size: int) -> None:
        """Remove a reserved file that could not be written, and take it out of the shared figure.

        Both under the lock: a listing by another writer either saw the file and the figure holds
        it, or comes after both and the figure is measured anew.
        """
        with self._folder_lock():
            record = self._load_usage()
            abandon(pending)
            if record is not None:
                self._store_usage(max(0, record[0] - size), record[1])

    @contextlib.contextmanager
    def _folder_lock(self) -> Iterator[None]:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _load_usage(self) -> tuple[int, float] | None:
        """The folder's usage and when it was last measured, as the lock's last holder left them."""
        match = _RECORD_RE.match(os.pread(self._lock_fd, RECORD_BYTES, 0))
        return (int(match.group(1)), float(match.group(2))) if match else None

    def _store_usage(self, usage: int, measured_at: float) -> None:
        os.pwrite(self._lock_fd, _RECORD.format(usage=usage, measured_at=measured_at).encode(), 0)

    def _make_room(self, size: int) -> tuple[int, float]:
        """With the folder lock held: evict least-recently-used chunk files if ``size`` does not fit.

        Returns the folder's usage afterwards and when it was measured; the caller checks the fit.
        """
        record = self._load_usage()
        now = time.time()
        listed = record is None or not 0 <= now - record[1] <= USAGE_MEASURE_S
        usage, measured_at = (self._list(), now) if listed else record
        if usage + size <= self.max_bytes:
            if listed:
                self._store_usage(usage, measured_at)
            return usage, measured_at
        stale_view = time.monotonic() - self._listed_at > USAGE_MEASURE_S
        if not listed and (stale_view or usage + size - self._lru.bytes > self.max_bytes):
            usage, measured_at, listed = self._list(), now, True  # look at what others wrote first
        goal = int(self.max_bytes * LOW_WATER)
        usage = self._evict(usage, size, goal)
        if usage + size > self.max_bytes and not listed:
            usage, measured_at = self._list(), now  # the files it knew were gone: the folder holds others
            usage = self._evict(usage, size, goal)
        self._store_usage(usage, measured_at)
        return usage, measured_at

    def _evict(self, usage: int, size: int, goal: int) -> int:
        """Delete the oldest known chunk files until ``usage + size <= goal`` or none is left; the new usage.

        Each candidate is stat'ed first: one touched since (younger than known) moves up the order
        and stays; one that is gone is forgotten. Only what this call removes leaves the figure.
        """
        while usage + size > goal:
            oldest = self._lru.oldest()
            if oldest is None:
                break
            name, known_mtime, _ = oldest
            path = os.path.join(self.folder, name)
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                self._lru.discard(name)
                continue
            if stat.st_mtime > known_mtime:
                self._lru.add(name, stat.st_mtime, stat.st_size)  # used since: its new place in the order
                continue
            self._lru.discard(name)
            if not remove(path):
                continue
            usage -= stat.st_size
            parsed = parse_file_name(name)
            if parsed and parsed[0] == self.namespace_hex[:16]:
                self._evicted.append(bytes.fromhex(parsed[2]))
        return max(usage, RECORD_BYTES)

    def _list(self) -> int:
        """With the folder lock held: list the folder, know every chunk file in it; its usage."""
        chunks, usage = self._measure()
        self._lru.reset(chunks)
        self._listed_at = time.monotonic()
        return usage

    def _measure(self) -> tuple[list[tuple[float, int, str]], int]:
        """This library's files in the folder: ``(mtime, size, name)`` of each chunk, and the total bytes.

        The total counts the lock file at the size of its usage record.
        """
        chunks, total = [], RECORD_BYTES
        with os.scandir(self.folder) as it:
            for item in it:
                is_chunk = item.name.endswith(SUFFIX) and parse_file_name(item.name) is not None
                if not is_chunk and not item.name.endswith(TMP_SUFFIX):
                    continue
                try:
                    stat = item.stat()
                except FileNotFoundError:
                    continue
                total += stat.st_size
                if is_chunk:
                    chunks.append((stat.st_mtime, stat.st_size, item.name))
        return chunks, total

    def _disable(self, exc: OSError) -> None:
        if self.disabled_reason is None:
            self.disabled_reason = f"{exc.strerror or exc} ({self.folder})"
            logger.warning(
                "lmcache_connector: disk tier writes stopped: %s. Serving and the memory tier go on; "
                "chunks already on disk can still be loaded.",
                self.disabled_reason,
            )

    # ------------------------------------------------------------ reads

    def read_into(self, expect: ChunkHeader, regions: Sequence[memoryview]) -> None:
        """Fill ``regions`` from the chunk's file, verified. Raises :class:`ChunkFileError` on any problem."""
        path = self.path(expect.key)
        try:
            read_chunk_into(path, expect, regions)
        except (MissingChunkError, ForeignChunkError):
            raise
        except ChunkFileError as exc:
            logger.warning("Removing corrupt cache file %s: %s", os.path.basename(path), exc)
            remove_quietly(path)
            raise

    # ------------------------------------------------------------ shutdown

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait (at most ``timeout`` seconds) until every write submitted before this call is done."""
        with self._progress:
            target = self._submitted
            self._progress.wait_for(lambda: self._finished >= target or not self._thread.is_alive(), timeout)
            left = target - self._finished
        if left > 0:
            logger.warning(
                "lmcache_connector: %d chunk writes were not on disk after %.0f s; at shutdown they are dropped",
                left,
                timeout,
            )
        return left <= 0

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (for at most ``timeout`` seconds), then stop the writer; later writes fail."""
        if self._closed:
            return
        self.flush(timeout)
        atexit.unregister(self.flush)
        with self._progress:
            self._closed = True
            self._stopping = True
            self._jobs.put(None)
