"""The disk tier's bytes, worker side: background writes of memory slots to chunk files, and reads.

* ``submit_write`` queues a slot for writing; a background thread writes it (checksum, temporary
  file, rename) while the forward pass goes on. The slot must stay untouched until the write is
  reported (the scheduler keeps the chunk pinned meanwhile).
* Before each write the folder is kept within its size bound, counting every file of this library
  in it (every namespace and engine, temporary files included): under an exclusive lock on
  ``.lmc.lock`` the writer measures the folder, deletes least-recently-used chunk files (oldest
  modification time first) until the new file fits, and reserves the new file at its full size,
  so processes sharing the folder never overshoot together.
* ``read_into`` reads a chunk file into a slot and verifies its header and checksum; a corrupt or
  truncated file is deleted and reported, a missing one (evicted by another engine) is a miss.
* A full disk or an unwritable folder stops writes with one warning; loads and the memory tier go on.
* ``flush`` (at shutdown and at interpreter exit) writes what is queued, for at most a bounded time.
"""

from __future__ import annotations

import atexit
import collections
import errno
import fcntl
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .disk_format import (
    LOCK_NAME,
    SUFFIX,
    TMP_SUFFIX,
    ChunkFileError,
    ChunkHeader,
    ForeignChunkError,
    MissingChunkError,
    abandon,
    checksum,
    commit,
    encode_header,
    parse_file_name,
    read_chunk_into,
    reserve_temp,
)

logger = logging.getLogger("lmcache_connector")

USAGE_CACHE_S = 1.0  # how long a measured folder size is trusted while far from the bound


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
        self._usage = 0
        self._usage_at = 0.0
        self._idle = threading.Event()
        self._idle.set()
        try:
            os.makedirs(folder, exist_ok=True)
            self._lock_fd = os.open(os.path.join(folder, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            self._disable(exc)
            self._lock_fd = -1
        self._thread = threading.Thread(target=self._run, name="lmcache-disk-writer", daemon=True)
        self._thread.start()
        atexit.register(self.flush)

    def path(self, key_hex: str) -> str:
        return os.path.join(self.folder, f"{self.namespace_hex[:16]}-{self.rank}-{key_hex}{SUFFIX}")

    # ------------------------------------------------------------ writes

    def submit_write(self, store_id: int, header: ChunkHeader, regions: Sequence[memoryview]) -> None:
        if self.disabled_reason is not None:
            self._results.append(WriteResult(store_id, ok=False))
            return
        self._idle.clear()
        self._jobs.put(WriteJob(store_id, header, regions))

    def take_results(self) -> tuple[list[WriteResult], list[bytes]]:
        """Writes finished since the last call, and keys of our chunks deleted to make room."""
        results = [self._results.popleft() for _ in range(len(self._results))]
        evicted = [self._evicted.popleft() for _ in range(len(self._evicted))]
        return results, evicted

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            started = time.perf_counter()
            ok = False
            try:
                if self.disabled_reason is None:
                    ok = self._write(job) > 0
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EROFS, errno.EPERM):
                    self._disable(exc)
                else:
                    logger.warning("Writing chunk %s to disk failed: %s", job.header.key[:12], exc)
            except Exception:
                logger.exception("Writing chunk %s to disk failed", job.header.key[:12])
            nbytes = job.header.nbytes if ok else 0
            self._results.append(WriteResult(job.store_id, ok, nbytes, time.perf_counter() - started))
            if self._jobs.empty():
                self._idle.set()

    def _write(self, job: WriteJob) -> int:
        header = replace(job.header, checksum=checksum(job.regions))
        encoded = encode_header(header)
        size = len(encoded) + header.nbytes
        if size > self.max_bytes:
            return 0
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            if not self._make_room(size):
                return 0
            pending = reserve_temp(self.folder, header, size)
            self._usage += size
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        try:
            commit(pending, encoded, job.regions, self.fsync)
        except BaseException:
            abandon(pending)
            raise
        return size

    def _make_room(self, size: int) -> bool:
        """With the folder lock held: delete least-recently-used chunk files until ``size`` fits."""
        now = time.monotonic()
        if now - self._usage_at > USAGE_CACHE_S or self._usage + size > self.max_bytes:
            files, self._usage = self._measure()
            self._usage_at = now
        else:
            return True
        if self._usage + size <= self.max_bytes:
            return True
        for _mtime, nbytes, name in sorted(files):  # oldest first
            try:
                os.unlink(os.path.join(self.folder, name))
            except FileNotFoundError:
                pass
            self._usage -= nbytes
            parsed = parse_file_name(name)
            if parsed and parsed[0] == self.namespace_hex[:16]:
                self._evicted.append(bytes.fromhex(parsed[2]))
            if self._usage + size <= self.max_bytes:
                return True
        return False

    def _measure(self) -> tuple[list[tuple[float, int, str]], int]:
        """This library's files in the folder: ``(mtime, size, name)`` of each chunk, and the total bytes."""
        chunks, total = [], 0
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
            try:
                os.unlink(path)
            except OSError:
                pass
            raise

    # ------------------------------------------------------------ shutdown

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait (at most ``timeout`` seconds) until every queued write is on disk."""
        done = self._idle.wait(timeout)
        if not done:
            logger.warning(
                "lmcache_connector: %d chunk writes still queued at shutdown were dropped", self._jobs.qsize()
            )
        return done

    def close(self, timeout: float = 10.0) -> None:
        self.flush(timeout)
        self._jobs.put(None)
