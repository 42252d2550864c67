"""Scheduler-side bookkeeping of the disk tier: which chunks of this namespace are on disk. No bytes.

The folder is the truth; the catalog is a cache of it, rebuilt at start from file names and headers
(never by reading chunk bytes, whose checksums are verified on every load instead) and refreshed
periodically, so chunks written by another engine sharing the folder become hits too, and chunks
another engine evicted are forgotten. A background thread does all folder I/O; the scheduler thread
only drains its results (``poll``) and asks it to refresh recency (``touch``), so scheduling never
waits on the disk.

* ``lookup(fps)``-style queries go through :meth:`best_piece`, like the memory index: every block
  boundary of every chunk is indexed (from the headers), so a prompt diverging inside a chunk still
  reuses the blocks before the divergence.
* A chunk counts only when the files of every rank (TP x PP) are present.
* Recency lives in the files' modification times (``touch`` on every use), so least-recently-used
  order survives restarts and is shared by every process using the folder.
* Start-up reads headers synchronously for up to ``startup_budget_s``, then goes on in the background:
  a large folder never delays the engine's start.
* ``clear()`` (a cache reset) forgets every chunk at once and deletes this namespace's files in the
  background; chunks whose write was still in flight are *banned* until their file landed and was
  deleted too, so nothing written from before a reset can come back through a rescan.
* Leftovers are cleaned: temporary files of writers that no longer run, and chunk files of ours
  whose header or size is wrong (a truncated or corrupt file is never loaded).
* With ``track_changes()`` (vLLM's KV-cache events on) every chunk added or removed is recorded for
  ``take_changes()``, with the ``event_info`` of its header when a scan found it; the chunks held
  when tracking starts are described from their headers by the background thread.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass

from lmcache_connector.tiers.disk.folder import remove_quietly
from lmcache_connector.tiers.disk.format import (
    TMP_SUFFIX,
    ChunkFileError,
    ForeignChunkError,
    chunk_file_name,
    parse_file_name,
    read_header,
    temp_writer_pid,
)

logger = logging.getLogger("lmcache_connector")

TEMP_IDLE_S = 10.0  # a temporary file this idle whose writer's pid is gone was left by a crash
TEMP_ABANDONED_S = 600.0


@dataclass(eq=False)
class DiskEntry:
    key: bytes
    block_fps: tuple[bytes, ...]
    nbytes: int  # all ranks' files

    @property
    def num_blocks(self) -> int:
        return len(self.block_fps)


class DiskCatalog:
    def __init__(
        self,
        folder: str,
        namespace_hex: str,
        rank_tags: list[str],
        rescan_interval_s: float = 10.0,
        startup_budget_s: float = 2.0,
    ):
        self.folder = folder
        self.rescan_interval_s = rescan_interval_s
        self.namespace_hex = namespace_hex
        self.rank_tags = rank_tags
        self._entries: dict[bytes, DiskEntry] = {}
        self._by_block: dict[bytes, list[DiskEntry]] = {}
        self._results: queue.SimpleQueue = queue.SimpleQueue()  # ("add", entry) / ("remove", key)
        self._touches: queue.SimpleQueue = queue.SimpleQueue()  # keys to touch, or ("delete", keys) / ("clear",)
        self._generation = 0  # results of scans started before the last clear() are ignored
        self._banned: set[bytes] = set()
        self._stop = threading.Event()
        self._changes: list[tuple[bytes, bool, str]] | None = None  # (key, held, event_info), while tracked
        self.used_bytes = 0  # all of this library's files in the folder, any namespace
        os.makedirs(folder, exist_ok=True)
        known = self._scan(deadline=time.monotonic() + startup_budget_s)
        self.poll()
        self._thread = threading.Thread(target=self._run, args=(known,), name="lmcache-disk-catalog", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ scheduler-thread API

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def get(self, key: bytes) -> DiskEntry | None:
        return self._entries.get(key)

    def best_piece(self, block_fps: list[bytes]) -> tuple[DiskEntry, int] | None:
        """The stored chunk covering the most leading blocks of ``block_fps`` (one chunk's blocks)."""
        for n in range(len(block_fps), 0, -1):
            holders = self._by_block.get(block_fps[n - 1])
            if holders:
                return holders[0], n
        return None

    def add(self, key: bytes, block_fps: tuple[bytes, ...], nbytes: int, event_info: str = "") -> None:
        """A chunk this engine just wrote (every rank reported its file), or a scan found."""
        if key in self._entries or key in self._banned:
            return
        entry = DiskEntry(key, tuple(block_fps), nbytes)
        self._entries[key] = entry
        for fp in entry.block_fps:
            self._by_block.setdefault(fp, []).append(entry)
        if self._changes is not None:
            self._changes.append((key, True, event_info))

    def remove(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        if self._changes is not None:
            self._changes.append((key, False, ""))
        for fp in entry.block_fps:
            holders = self._by_block[fp]
            holders.remove(entry)
            if not holders:
                del self._by_block[fp]

    def touch(self, key: bytes) -> None:
        """Mark a chunk as just used (its files' mtime), in the background."""
        self._touches.put(key)

    def clear(self, in_flight: list[bytes] = ()) -> None:
        """Forget every chunk of this namespace now, and delete their files in the background.

        ``in_flight`` are chunks whose files may still land: they stay banned until :meth:`delete`
        (after the write) or :meth:`unban` (the write failed).
        """
        for key in list(self._entries):
            self.remove(key)
        self._banned.update(in_flight)
        self._generation += 1
        self._touches.put(("clear", self._generation))

    def delete(self, key: bytes) -> None:
        """Forget a chunk and delete its files (every rank's), in the background."""
        self.remove(key)
        self._touches.put(("delete", key))

    def unban(self, key: bytes) -> None:
        self._banned.discard(key)

    def track_changes(self) -> None:
        """Record additions and removals from now on; the chunks held now are reported as added
        once the background thread has read their headers' ``event_info``."""
        if self._changes is None:
            self._changes = []
            self._touches.put(("describe", list(self._entries), self._generation))

    def take_changes(self) -> list[tuple[bytes, bool, str]]:
        """``(key, held, event_info)`` since the last call, in order."""
        if not self._changes:
            return []
        changes, self._changes = self._changes, []
        return changes

    def poll(self) -> None:
        """Apply what the background thread found since the last call."""
        while True:
            try:
                item = self._results.get_nowait()
            except queue.Empty:
                return
            action, value, generation = item if len(item) == 3 else (*item, self._generation)
            if generation != self._generation and action in ("add", "remove"):
                continue  # found by a scan from before the last clear()
            if action == "deleted":
                self._banned.discard(value)
            elif action == "add":
                self.add(*value)
            elif action == "remove":
                self.remove(value)
            elif action == "used":
                self.used_bytes = value
            elif action == "described":
                key, event_info = value
                if generation == self._generation and key in self._entries and self._changes is not None:
                    self._changes.append((key, True, event_info))

    def close(self) -> None:
        """Stop the background thread, after recording the recency of every chunk used so far."""
        self._stop.set()
        self._touches.put(("wake",))  # the thread waits on this queue: stop now, not at its next timeout
        self._thread.join(timeout=5)
        while True:
            try:
                command = self._touches.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, bytes):
                self._touch_files(command)
            elif command[0] == "delete":
                self._delete_files(command[1])
            elif command[0] == "clear":
                self._delete_namespace()

    @property
    def stored_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    # ------------------------------------------------------------ background thread

    def _run(self, known: set[str]) -> None:
        next_scan = time.monotonic() + self.rescan_interval_s
        generation = 0
        while not self._stop.is_set():
            try:
                command = self._touches.get(timeout=0.5)
                if isinstance(command, bytes):
                    self._touch_files(command)
                elif command[0] == "delete":
                    self._delete_files(command[1])
                    known.discard(command[1].hex())
                    self._results.put(("deleted", command[1], generation))
                elif command[0] == "clear":
                    generation = command[1]
                    self._delete_namespace()
                    known = set()
                elif command[0] == "describe":
                    for key in command[1]:
                        self._results.put(("described", (key, self._event_info(key.hex())), command[2]))
            except queue.Empty:
                pass
            except Exception:
                logger.warning("disk catalog: background work on %s failed", self.folder, exc_info=True)
            if time.monotonic() >= next_scan:
                try:
                    known = self._scan(deadline=None, known=known, generation=generation)
                except Exception:
                    logger.warning("disk catalog: rescanning %s failed", self.folder, exc_info=True)
                next_scan = time.monotonic() + self.rescan_interval_s

    def _touch_files(self, key: bytes) -> None:
        now = time.time()
        for tag in self.rank_tags:
            try:
                os.utime(self.file_path(tag, key.hex()), (now, now))
            except FileNotFoundError:
                pass

    def _delete_files(self, key: bytes) -> None:
        for tag in self.rank_tags:
            remove_quietly(self.file_path(tag, key.hex()))

    def _delete_namespace(self) -> None:
        with os.scandir(self.folder) as it:
            for item in it:
                parsed = parse_file_name(item.name)
                if parsed is not None and parsed[0] == self.namespace_hex[:16] and parsed[1] in self.rank_tags:
                    remove_quietly(item.path)

    def file_path(self, tag: str, key_hex: str) -> str:
        """Where rank ``tag``'s copy of chunk ``key_hex`` lives (whether or not it is there)."""
        return os.path.join(self.folder, chunk_file_name(self.namespace_hex, tag, key_hex))

    def _scan(self, deadline: float | None, known: set[str] | None = None, generation: int = 0) -> set[str]:
        """List the folder; report new complete chunks of our namespace and vanished ones."""
        known = known or set()
        ranks_by_key: dict[str, set[str]] = {}
        used = 0
        with os.scandir(self.folder) as it:
            for item in it:
                name = item.name
                if name.endswith(TMP_SUFFIX):
                    used += self._account_temp(item)
                    continue
                parsed = parse_file_name(name)
                if parsed is None:
                    continue  # not ours: never touched, never counted
                try:
                    used += item.stat().st_size
                except FileNotFoundError:
                    continue
                namespace16, tag, key_hex = parsed
                if namespace16 == self.namespace_hex[:16] and tag in self.rank_tags:
                    ranks_by_key.setdefault(key_hex, set()).add(tag)
        self._results.put(("used", used))

        complete = {k for k, tags in ranks_by_key.items() if len(tags) == len(self.rank_tags)}
        for key_hex in known - complete:
            self._results.put(("remove", bytes.fromhex(key_hex), generation))
        added = set()
        for key_hex in complete - known:
            if deadline is not None and time.monotonic() > deadline:
                continue  # the background rescan picks the rest up
            entry = self._read_entry(key_hex)
            if entry is not None:
                self._results.put(("add", entry, generation))
                added.add(key_hex)
        return (known & complete) | added

    def _event_info(self, key_hex: str) -> str:
        try:
            return read_header(self.file_path(self.rank_tags[0], key_hex))[0].event_info
        except (ChunkFileError, OSError):
            return ""  # gone or unreadable: its removal, if any, is reported by a scan

    def _read_entry(self, key_hex: str) -> tuple[bytes, tuple[bytes, ...], int, str] | None:
        total = 0
        block_fps: tuple[bytes, ...] = ()
        event_info = ""
        for tag in self.rank_tags:
            path = self.file_path(tag, key_hex)
            try:
                header, _, size = read_header(path)
                if header.key != key_hex or not header.namespace.startswith(self.namespace_hex[:16]):
                    raise ChunkFileError("header does not match its name")
                if header.namespace != self.namespace_hex:
                    return None  # a different namespace that shares the 16-digit prefix: not ours to use
                block_fps = tuple(bytes.fromhex(fp) for fp in header.block_fps)
                event_info = event_info or header.event_info
                total += size
            except ForeignChunkError:
                return None  # another version of this library: neither loaded nor deleted
            except ChunkFileError as exc:
                logger.warning("Removing unusable cache file %s: %s", os.path.basename(path), exc)
                remove_quietly(path)
                return None
            except FileNotFoundError:
                return None
        if not block_fps or block_fps[-1] != bytes.fromhex(key_hex):
            return None
        return bytes.fromhex(key_hex), block_fps, total, event_info

    def _account_temp(self, item: os.DirEntry) -> int:
        """Count a temporary file, or remove it if its writer crashed.

        A writer's pid may belong to another container sharing the folder, so a dead-looking pid
        alone is not enough: the file must also have been idle for a while (a write takes
        milliseconds), or idle for very long whatever its pid says.
        """
        try:
            stat = item.stat()
        except FileNotFoundError:
            return 0
        idle = time.time() - stat.st_mtime
        pid = temp_writer_pid(item.name)
        if (idle > TEMP_IDLE_S and pid is not None and not _pid_alive(pid)) or idle > TEMP_ABANDONED_S:
            remove_quietly(item.path)
            return 0
        return stat.st_size


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
