"""The on-disk format of one chunk: a safetensors file that can never run code.

Layout (the safetensors format, written by hand so the bytes go straight from the memory pool to the
file without an intermediate copy)::

    8 bytes   little-endian length N of the JSON header
    N bytes   {"__metadata__": {...}, "kv": {"dtype": "U8", "shape": [R, n, row], "data_offsets": [0, size]}}
    size      the chunk bytes: R regions x n blocks x row bytes (the chunk-buffer format of ``ops``)

``__metadata__`` records the format and its version, the chunk key, the namespace (rank-less, and
the rank), the fingerprint of every block boundary in the chunk (so a restarted engine rebuilds the
block-granular index from headers alone) and an xxh3-64 checksum of the bytes, verified on every
load. An optional ``event_info`` holds what the connector needs to announce the chunk to routers
again after a restart (vLLM's block hashes, the tokens, the block-hash settings they were computed
under: :mod:`lmcache_connector.connector.kv_events`); it is written only when vLLM's KV-cache events
are on, is opaque here, and is absent from older files, which stay valid chunks (just never
announced), so the format version did not change.

Files are written under a temporary name and renamed into place, so a crash never leaves a
half-written file under a chunk's name (the writing itself, and every removal, is in ``folder.py``).

File names: ``<namespace16>-<rank>-<key>.lmc.safetensors``; temporary files end in ``.lmc.tmp``
and carry the writer's pid, so a start-up can tell an abandoned one from a write in progress.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from lmcache_connector.keys import rank_tag, storage_name  # noqa: F401 (callers import rank_tag from here too)

FORMAT = "lmcache_connector.chunk"
FORMAT_VERSION = "1"
SUFFIX = ".lmc.safetensors"
LOCK_NAME = ".lmc.lock"  # writers sharing a folder serialise their size checks on it; it holds the usage figure
TMP_SUFFIX = ".lmc.tmp"
TENSOR_NAME = "kv"
MAX_HEADER_BYTES = 1 << 20

_NAME = re.compile(r"^([0-9a-f]{16})-(tp\d+pp\d+)-([0-9a-f]{32})" + re.escape(SUFFIX) + "$")
_TMP_NAME = re.compile(r"^.*\.(\d+)\.[0-9a-f]+" + re.escape(TMP_SUFFIX) + "$")


class ChunkFileError(Exception):
    """A chunk file that must not be loaded: missing, truncated, corrupt, foreign or not ours."""


class MissingChunkError(ChunkFileError):
    """The file is not there (never written, or evicted by another engine): a plain miss."""


class ForeignChunkError(ChunkFileError):
    """A well-formed file of another format version: not ours to read, not ours to delete."""


@dataclass(frozen=True)
class ChunkHeader:
    key: str  # hex fingerprint of the chunk's last block
    namespace: str  # hex digest of the rank-less namespace
    rank: str  # "tp0pp0"
    block_fps: tuple[str, ...]  # hex fingerprints of every block boundary in the chunk
    shape: tuple[int, int, int]  # regions, blocks, row bytes
    checksum: str = ""  # "xxh3_64:<hex>"
    namespace_info: str = ""  # JSON description of the namespace, for humans and the CLI
    event_info: str = ""  # the connector's KV-event description of the chunk; "" when events are off

    @property
    def nbytes(self) -> int:
        regions, blocks, row = self.shape
        return regions * blocks * row

    @property
    def file_name(self) -> str:
        return chunk_file_name(self.namespace, self.rank, self.key)


def chunk_file_name(namespace_hex: str, rank: str, key_hex: str) -> str:
    return storage_name(namespace_hex, rank, key_hex) + SUFFIX


def parse_file_name(name: str) -> tuple[str, str, str] | None:
    """``(namespace16, rank, key)`` for a chunk file name of ours, else ``None``."""
    match = _NAME.match(name)
    return match.groups() if match else None


def is_ours(name: str) -> bool:
    """Files this library owns in a cache folder (chunks and temporary files): they count toward its size."""
    return name.endswith(SUFFIX) and parse_file_name(name) is not None or name.endswith(TMP_SUFFIX)


def temp_writer_pid(name: str) -> int | None:
    match = _TMP_NAME.match(name)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------- checksums


def checksum(regions: Sequence[memoryview]) -> str:
    digest = xxhash.xxh3_64()
    for region in regions:
        digest.update(region)
    return "xxh3_64:" + digest.hexdigest()


# ---------------------------------------------------------------- writing


def encode_header(header: ChunkHeader) -> bytes:
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "key": header.key,
        "namespace": header.namespace,
        "rank": header.rank,
        "block_fps": ",".join(header.block_fps),
        "checksum": header.checksum,
        "namespace_info": header.namespace_info,
    }
    if header.event_info:
        metadata["event_info"] = header.event_info
    body = {
        "__metadata__": metadata,
        TENSOR_NAME: {"dtype": "U8", "shape": list(header.shape), "data_offsets": [0, header.nbytes]},
    }
    raw = json.dumps(body, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


# ---------------------------------------------------------------- reading


def read_header(path: str) -> tuple[ChunkHeader, int, int]:
    """Parse and sanity-check a chunk file's header without reading its bytes.

    Returns the header, the offset of the data and the file size. Raises :class:`ChunkFileError`
    for anything that is not a complete chunk file of this format (including a truncated one).
    """
    fd = _open(path)
    try:
        return _read_header_fd(fd)
    finally:
        os.close(fd)


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise MissingChunkError(f"cannot open: {exc.strerror}") from exc


def _read_header_fd(fd: int) -> tuple[ChunkHeader, int, int]:
    try:
        size = os.fstat(fd).st_size
        prefix = os.pread(fd, 8, 0)
        if len(prefix) < 8:
            raise ChunkFileError("truncated header")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES or length > size - 8:
            raise ChunkFileError("header length out of range")
        raw = os.pread(fd, length, 8)
    except OSError as exc:
        raise MissingChunkError(f"cannot read: {exc.strerror}") from exc
    header = decode_header(raw)
    if size != 8 + length + header.nbytes:
        raise ChunkFileError(f"size {size} does not match its header ({8 + length + header.nbytes}): truncated")
    return header, 8 + length, size


def decode_header(raw: bytes) -> ChunkHeader:
    try:
        body = json.loads(raw)
        meta = body["__metadata__"]
        tensor = body[TENSOR_NAME]
        if meta.get("format") != FORMAT:
            raise ChunkFileError("not a lmcache_connector chunk")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ForeignChunkError(f"format version {meta.get('format_version')} is not {FORMAT_VERSION}")
        shape = tuple(int(x) for x in tensor["shape"])
        if tensor["dtype"] != "U8" or len(shape) != 3 or tensor["data_offsets"] != [0, shape[0] * shape[1] * shape[2]]:
            raise ChunkFileError("unexpected tensor description")
        return ChunkHeader(
            key=meta["key"],
            namespace=meta["namespace"],
            rank=meta["rank"],
            block_fps=tuple(meta["block_fps"].split(",")) if meta["block_fps"] else (),
            shape=shape,
            checksum=meta["checksum"],
            namespace_info=meta.get("namespace_info", ""),
            event_info=meta.get("event_info", "") if isinstance(meta.get("event_info"), str) else "",
        )
    except ChunkFileError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ChunkFileError(f"malformed header ({exc})") from exc


def read_chunk_into(path: str, expect: ChunkHeader | None, regions: Sequence[memoryview]) -> ChunkHeader:
    """Read a chunk's bytes into ``regions`` (one buffer per region) and verify them.

    ``expect`` (key, namespace, rank, shape) must match the file's header. Raises
    :class:`ChunkFileError` when the file is missing, foreign, truncated or fails its checksum;
    the buffers may then hold garbage and must not be used.
    """
    fd = _open(path)  # one descriptor for header and bytes: the file cannot change in between
    try:
        header, offset, _ = _read_header_fd(fd)
        if expect is not None and (header.key, header.namespace, header.rank, header.shape) != (
            expect.key,
            expect.namespace,
            expect.rank,
            expect.shape,
        ):
            raise ChunkFileError("header does not match the chunk that was asked for")
        digest = _read_all(fd, [r.cast("B") if r.format != "B" else r for r in regions], offset)
    finally:
        os.close(fd)
    if "xxh3_64:" + digest.hexdigest() != header.checksum:
        raise ChunkFileError("checksum mismatch: the file is corrupt")
    return header


def _read_all(fd: int, buffers: list[memoryview], offset: int):
    """Read the buffers in order and hash them as they arrive.

    Hashing each piece right after reading it, while it is still in the CPU cache, makes the
    checksum nearly free next to the read; a second pass over the whole chunk would not be.
    """
    digest = xxhash.xxh3_64()
    piece = 1 << 20
    for buffer in buffers:
        for start in range(0, len(buffer), piece):
            view = buffer[start : start + piece]
            filled = 0
            while filled < len(view):
                got = os.preadv(fd, [view[filled:]], offset)
                if got <= 0:
                    raise ChunkFileError("unexpected end of file")
                offset += got
                filled += got
            digest.update(view)
    return digest
