"""A disk-tier folder's files: how a chunk file gets in, the one way files get out, and offline care.

* **In:** :func:`reserve_temp` creates a temporary file at the chunk's full size (so every process
  counting the folder sees it), :func:`fill` writes it, :func:`publish` renames it into place (the
  chunk appears whole or not at all) and :func:`abandon` removes it after a failure.
  :func:`write_chunk` does all of it in one call (tests and tools; the disk tier's writer does the
  steps under its folder lock).
* **Out:** :func:`remove` is the only place any file of a cache folder is deleted (evictions,
  corrupt or unusable files, a cache reset, crashed writers' leftovers, ``disk clear`` and
  ``disk verify --delete``). It removes this library's files only: chunk and temporary files,
  never the lock file or anything else. It does not change the folder's shared usage figure
  (:mod:`lmcache_connector.tiers.disk.store`): only an eviction under the lock does, so a removal
  elsewhere leaves the figure too high (an early eviction), never too low.
* **Offline** (``lmcache-connector disk stats|verify|clear``): plain functions over a folder, each
  returning a dataclass that the command prints as text or JSON.

Everything here names files through :mod:`lmcache_connector.tiers.disk.format`, so what it calls a
chunk, a temporary file or someone else's file is exactly what the disk tier calls one:

* *chunk files* — named ``<namespace16>-<rank>-<key>.lmc.safetensors``;
* *temporary files* — ``*.lmc.tmp``: a write in progress, or one a crash left behind;
* the disk tier's lock file (``.lmc.lock``) — skipped, and never removed: an engine that holds it
  would lose its mutual exclusion with the others sharing the folder;
* *other files* — anything else. They are counted and never opened, changed or removed.

A chunk file written by another format version of this library is neither damaged nor readable
here: ``stats`` and ``verify`` count it apart and ``verify --delete`` leaves it (an engine of that
version may share the folder); ``clear``, asked to empty the cache, removes it like any chunk.

Everything here is safe while an engine uses the folder: a chunk removed under it is a miss for the
engine, and a file that disappears during a scan (evicted) is skipped, not reported as damaged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from lmcache_connector.tiers.disk.format import (
    LOCK_NAME,
    SUFFIX,
    TMP_SUFFIX,
    ChunkFileError,
    ChunkHeader,
    ForeignChunkError,
    checksum,
    encode_header,
    is_ours,
    parse_file_name,
    read_chunk_into,
    read_header,
)

# ---------------------------------------------------------------- in: writing a chunk file


@dataclass
class PendingWrite:
    """A temporary file reserved at its final size (so every process counting the folder sees it)."""

    fd: int
    temp: str
    final: str


def reserve_temp(folder: str, header: ChunkHeader, size: int) -> PendingWrite:
    final = os.path.join(folder, header.file_name)
    temp = f"{final[: -len(SUFFIX)]}.{os.getpid()}.{os.urandom(4).hex()}{TMP_SUFFIX}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.posix_fallocate(fd, 0, size)
    except BaseException:
        os.close(fd)
        remove_quietly(temp)
        raise
    return PendingWrite(fd, temp, final)


def fill(pending: PendingWrite, encoded_header: bytes, regions: Sequence[memoryview], fsync: bool = True) -> None:
    """Write the header and bytes into the reserved file and close it. On failure the caller abandons it."""
    _write_all(pending.fd, [memoryview(encoded_header), *regions])
    if fsync:
        os.fsync(pending.fd)
    os.close(pending.fd)
    pending.fd = -1


def publish(pending: PendingWrite) -> None:
    """Rename a filled temporary file into place: the chunk appears whole or not at all."""
    os.rename(pending.temp, pending.final)


def abandon(pending: PendingWrite) -> None:
    if pending.fd >= 0:
        os.close(pending.fd)
        pending.fd = -1
    remove_quietly(pending.temp)


def write_chunk(folder: str, header: ChunkHeader, regions: Sequence[memoryview], fsync: bool = True) -> int:
    """Write one chunk atomically, outside any lock; return the file's size. Raises ``OSError`` (e.g. ENOSPC).

    The folder's usage figure does not count the file: this is for tests and tools, not for an
    engine sharing the folder (its writer is :class:`lmcache_connector.tiers.disk.store.DiskTier`).
    """
    header = replace(header, checksum=checksum(regions))
    encoded = encode_header(header)
    pending = reserve_temp(folder, header, len(encoded) + header.nbytes)
    try:
        fill(pending, encoded, regions, fsync)
        publish(pending)
    except BaseException:
        abandon(pending)
        raise
    return len(encoded) + header.nbytes


def _write_all(fd: int, buffers: list[memoryview]) -> None:
    pending = [b.cast("B") if b.format != "B" else b for b in buffers]
    while pending:
        written = os.writev(fd, pending[:1024])
        while written and pending:
            if written >= len(pending[0]):
                written -= len(pending[0])
                pending.pop(0)
            else:
                pending[0] = pending[0][written:]
                written = 0


# ---------------------------------------------------------------- out: the one removal


def remove(path: str) -> bool:
    """Delete one of this library's files from a cache folder; every deletion goes through here.

    True when this call removed it, False when it was already gone (another engine evicted it).
    Any other error (a read-only folder, say) is raised. Refuses the lock file and every file that
    is not this library's (:func:`~lmcache_connector.tiers.disk.format.is_ours`).
    """
    if not is_ours(os.path.basename(path)):
        raise ValueError(f"{path}: not a chunk or temporary file of lmcache_connector; it is never removed")
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def remove_quietly(path: str) -> bool:
    """:func:`remove` for cleanup that must not fail its caller: False when the file could not be removed."""
    try:
        return remove(path)
    except OSError:
        return False


@dataclass
class NamespaceSummary:
    namespace: str  # the 16 hex digits in the file names
    chunk_files: int = 0
    bytes: int = 0
    ranks: set[str] = field(default_factory=set)
    description: dict | str = ""  # from a chunk header: model, dtype, chunk size...


@dataclass
class BadFile:
    name: str
    problem: str  # "corrupt" or "truncated"
    reason: str
    deleted: bool = False


@dataclass
class FolderStats:
    folder: str
    chunk_files: int = 0
    chunk_bytes: int = 0
    namespaces: dict[str, NamespaceSummary] = field(default_factory=dict)
    temp_files: int = 0
    temp_bytes: int = 0
    unreadable: list[BadFile] = field(default_factory=list)  # header or size wrong (no bytes read)
    other_version_files: int = 0
    other_version_bytes: int = 0
    other_files: int = 0
    other_bytes: int = 0


@dataclass
class VerifyResult:
    folder: str
    checked: int = 0
    intact: int = 0
    intact_bytes: int = 0
    bad: list[BadFile] = field(default_factory=list)
    other_version_files: int = 0  # not checked: another version of this library reads them
    temp_files: int = 0  # not checked: they may still be written

    @property
    def remaining_bad(self) -> int:
        return sum(not b.deleted for b in self.bad)


@dataclass
class _Entry:
    name: str
    path: str
    size: int


def _entries(folder: str) -> list[_Entry]:
    entries = []
    with os.scandir(folder) as it:
        for item in it:
            try:
                size = item.stat(follow_symlinks=False).st_size if item.is_file(follow_symlinks=False) else 0
            except FileNotFoundError:
                continue  # removed while we looked (an eviction)
            entries.append(_Entry(item.name, item.path, size))
    return sorted(entries, key=lambda e: e.name)


def _is_chunk(name: str) -> bool:
    return parse_file_name(name) is not None


def _check_header(entry: _Entry) -> ChunkHeader:
    """The file's header, checked against its own name (a renamed file must not pass as another chunk)."""
    header, _, _ = read_header(entry.path)
    namespace16, rank, key = parse_file_name(entry.name)
    if (header.namespace[:16], header.rank, header.key) != (namespace16, rank, key):
        raise ChunkFileError("its header names another chunk than its file name")
    return header


def _problem(exc: ChunkFileError) -> str:
    text = str(exc)
    return "truncated" if "truncated" in text or "end of file" in text else "corrupt"


def _describe_namespace(info: str) -> dict | str:
    try:
        value = json.loads(info)
    except ValueError:
        return info
    return value if isinstance(value, dict) else info


# ---------------------------------------------------------------- stats


def folder_stats(folder: str) -> FolderStats:
    """Count what the folder holds, reading chunk headers but not chunk bytes."""
    stats = FolderStats(folder)
    for entry in _entries(folder):
        if entry.name == LOCK_NAME:
            continue
        if not is_ours(entry.name):
            stats.other_files += 1
            stats.other_bytes += entry.size
        elif entry.name.endswith(TMP_SUFFIX):
            stats.temp_files += 1
            stats.temp_bytes += entry.size
        else:
            try:
                header = _check_header(entry)
            except ForeignChunkError:
                stats.other_version_files += 1
                stats.other_version_bytes += entry.size
                continue
            except ChunkFileError as exc:
                if os.path.exists(entry.path):
                    stats.unreadable.append(BadFile(entry.name, _problem(exc), str(exc)))
                continue
            stats.chunk_files += 1
            stats.chunk_bytes += entry.size
            ns = stats.namespaces.setdefault(entry.name[:16], NamespaceSummary(entry.name[:16]))
            ns.chunk_files += 1
            ns.bytes += entry.size
            ns.ranks.add(header.rank)
            if not ns.description and header.namespace_info:
                ns.description = _describe_namespace(header.namespace_info)
    return stats


# ---------------------------------------------------------------- verify


def verify_folder(folder: str, delete: bool = False) -> VerifyResult:
    """Read every chunk file in full and check its header, size and checksum; optionally delete the bad ones."""
    result = VerifyResult(folder)
    buffer = bytearray()
    for entry in _entries(folder):
        if entry.name.endswith(TMP_SUFFIX) and is_ours(entry.name):
            result.temp_files += 1
            continue
        if not _is_chunk(entry.name):
            continue
        try:
            header = _check_header(entry)
            if len(buffer) < header.nbytes:
                buffer = bytearray(header.nbytes)  # one buffer, grown to the largest chunk
            read_chunk_into(entry.path, None, _regions(buffer, header))
        except ForeignChunkError:
            result.other_version_files += 1
            continue
        except ChunkFileError as exc:
            if not os.path.exists(entry.path):
                continue  # evicted while we read it: not damage
            result.checked += 1
            bad = BadFile(entry.name, _problem(exc), str(exc))
            if delete:
                bad.deleted = _remove(entry.path)
            result.bad.append(bad)
            continue
        result.checked += 1
        result.intact += 1
        result.intact_bytes += entry.size
    return result


def _regions(buffer: bytearray, header: ChunkHeader) -> list[memoryview]:
    regions, blocks, row = header.shape
    step = blocks * row
    view = memoryview(buffer)
    return [view[i * step : (i + 1) * step] for i in range(regions)]


# ---------------------------------------------------------------- clear


def files_to_clear(folder: str, namespace: str | None = None) -> list[_Entry]:
    """This library's files in the folder (chunks and temporary files), optionally of one namespace.

    ``namespace`` is a prefix of the 16 hex digits in the file names (the start-up log shows the
    first 12).
    """
    return [e for e in _entries(folder) if is_ours(e.name) and (not namespace or e.name.startswith(namespace))]


def remove_files(entries: list[_Entry]) -> tuple[int, int, list[str]]:
    """Remove the files; return how many and how many bytes went, and the errors of those that did not."""
    removed = removed_bytes = 0
    errors = []
    for entry in entries:
        try:
            if not remove(entry.path):
                continue  # already gone (evicted)
        except OSError as exc:
            errors.append(f"{entry.path}: {exc.strerror}")
            continue
        removed += 1
        removed_bytes += entry.size
    return removed, removed_bytes, errors


def _remove(path: str) -> bool:
    """True when the file is gone (removed now, or already)."""
    try:
        remove(path)
    except OSError:
        return False
    return True
