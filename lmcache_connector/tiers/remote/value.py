"""The format of one remote value: one rank's copy of one chunk, as a remote store holds it.

A value is written with one ``SET`` and read with one ``GET``, so it carries everything a reader
needs to decide whether the bytes are the ones it asked for::

    4 bytes   magic b"LMCV"
    2 bytes   little-endian format version (FORMAT_VERSION)
    2 bytes   reserved, 0
    4 bytes   little-endian length N of the JSON header (at most MAX_HEADER_BYTES)
    N bytes   {"namespace", "rank", "key", "block_fps", "dtype": "U8", "shape": [R, n, row], "checksum"}
    size      the chunk bytes: R regions x n blocks x row bytes (the chunk-buffer format of ``ops``)

The version sits in the fixed prefix, before the JSON, so that a later format may change anything
after it and a reader of this one still tells "another version" from "garbage". The header is the
same as the disk tier's (``tiers/disk/format.py``): namespace digest, rank tag, chunk key, every
block-boundary fingerprint, shape and an xxh3-64 checksum of the bytes.

Promises:

* reading a value never runs code: the header is JSON of a bounded length, parsed with the
  standard library; nothing is unpickled or evaluated, whatever was planted under a key;
* a value that is not exactly the chunk that was asked for raises, each case its own class so a
  store can count them: :class:`ForeignValueError` (another namespace, rank, key or shape, or not
  a value of this library), :class:`OtherVersionError`, :class:`TruncatedValueError` and
  :class:`CorruptValueError` (bad checksum, malformed header, trailing bytes). All derive from
  :class:`RemoteValueError`: to the caller every one is a miss, never KV in attention.

Standard library and ``xxhash`` only: importable without torch, vLLM or a Redis client.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

MAGIC = b"LMCV"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 1 << 20  # a chunk of 4,096 one-token blocks still fits (about 140 KB of fingerprints)
DTYPE = "U8"  # the chunk buffer is raw bytes; KV dtypes and layouts are in the namespace

_PREFIX = struct.Struct("<4sHHI")  # magic, version, reserved, header length
PREFIX_BYTES = _PREFIX.size
_PIECE = 1 << 20  # copy and hash in pieces that stay in the CPU cache between the two


class RemoteValueError(Exception):
    """A value that must not be loaded. The store counts it and reports a miss."""


class ForeignValueError(RemoteValueError):
    """A well-formed value of another chunk (namespace, rank, key, shape), or not a value of ours."""


class OtherVersionError(RemoteValueError):
    """A value of this library in another format version: not ours to read."""


class TruncatedValueError(RemoteValueError):
    """Fewer bytes than the value's own prefix and header promise."""


class CorruptValueError(RemoteValueError):
    """The bytes do not match the checksum, the header is malformed, or bytes trail the data."""


class ChecksumMismatchError(CorruptValueError):
    """Every byte of the value was read, and they do not match its checksum (a reader of a stream
    is still in step with it after this one)."""


@dataclass(frozen=True)
class ValueHeader:
    """What a value says about itself. ``checksum`` is empty on the header a reader expects."""

    namespace: str  # hex digest of the rank-less namespace
    rank: str  # rank tag, "tp0pp0"
    key: str  # hex fingerprint of the chunk's last block
    block_fps: tuple[str, ...]  # hex fingerprints of every block boundary in the chunk
    shape: tuple[int, int, int]  # regions, blocks, row bytes
    checksum: str = ""  # "xxh3_64:<hex>"

    @property
    def nbytes(self) -> int:
        regions, blocks, row = self.shape
        return regions * blocks * row


def encode_value(header: ValueHeader, regions: Sequence[memoryview]) -> list[bytes | memoryview]:
    """The value for ``regions`` (the chunk's bytes, region by region) as pieces to send in order.

    The first piece is the prefix and header (with the checksum of ``regions`` filled in); the others
    are the regions themselves, uncopied, so the caller decides whether and where to join them.
    """
    views = [_bytes_view(region) for region in regions]
    total = sum(len(view) for view in views)
    if total != header.nbytes:
        raise ValueError(f"the regions hold {total} bytes; the header's shape {header.shape} says {header.nbytes}")
    digest = xxhash.xxh3_64()
    for view in views:
        digest.update(view)
    body = {
        "namespace": header.namespace,
        "rank": header.rank,
        "key": header.key,
        "block_fps": list(header.block_fps),
        "dtype": DTYPE,
        "shape": list(header.shape),
        "checksum": "xxh3_64:" + digest.hexdigest(),
    }
    raw = json.dumps(body, separators=(",", ":")).encode()
    if len(raw) > MAX_HEADER_BYTES:
        raise ValueError(f"the header takes {len(raw)} bytes; at most {MAX_HEADER_BYTES} are allowed")
    return [_PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(raw)) + raw, *views]


def encode_value_bytes(header: ValueHeader, regions: Sequence[memoryview]) -> bytes:
    """:func:`encode_value` joined into one buffer: what one ``SET`` sends."""
    return b"".join(encode_value(header, regions))


def encode_value_into(header: ValueHeader, regions: Sequence[memoryview], buffer: bytearray) -> memoryview:
    """:func:`encode_value` written into ``buffer`` (grown when too small), as a view of its first
    bytes. A writer that reuses one buffer copies each chunk into memory that is already mapped,
    instead of allocating (and faulting in) a new one per chunk; the view is valid until the next call."""
    pieces = encode_value(header, regions)
    size = sum(len(piece) for piece in pieces)
    if len(buffer) < size:
        buffer.extend(bytes(size - len(buffer)))
    view = memoryview(buffer)
    offset = 0
    for piece in pieces:
        view[offset : offset + len(piece)] = piece
        offset += len(piece)
    return view[:size]


def read_header(data: bytes | memoryview) -> tuple[ValueHeader, int]:
    """The value's header and the offset of its bytes, checked for form and length (not checksum)."""
    view = _bytes_view(data)
    offset = PREFIX_BYTES + header_length(view[:PREFIX_BYTES])
    if len(view) < offset:
        raise TruncatedValueError(f"{len(view)} bytes: the header alone needs {offset}")
    header = _parse_header(bytes(view[PREFIX_BYTES:offset]))
    _check_length(header, offset, len(view))
    return header, offset


def header_length(prefix: bytes | memoryview) -> int:
    """The length of the JSON header, from a value's first :data:`PREFIX_BYTES` bytes (fewer: the
    value is truncated), checked: magic, version, bound."""
    view = _bytes_view(prefix)
    if len(view) < PREFIX_BYTES:
        if bytes(view[: len(MAGIC)]) != MAGIC[: len(view)]:
            raise ForeignValueError("not a lmcache_connector value (no magic)")
        raise TruncatedValueError(f"{len(view)} bytes: shorter than the value's {PREFIX_BYTES}-byte prefix")
    magic, version, _reserved, length = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise ForeignValueError("not a lmcache_connector value (no magic)")
    if version != FORMAT_VERSION:
        raise OtherVersionError(f"format version {version}, this reader knows {FORMAT_VERSION}")
    if length > MAX_HEADER_BYTES:
        raise CorruptValueError(f"header length {length} is over the bound of {MAX_HEADER_BYTES}")
    return length


def decode_value(data: bytes | memoryview, expect: ValueHeader, regions: Sequence[memoryview]) -> ValueHeader:
    """Check that ``data`` is the value of the chunk ``expect`` describes, and copy its bytes into ``regions``.

    ``expect`` names the namespace, rank, key and shape asked for (its ``block_fps`` too, when
    given); ``regions`` are the caller's buffers, filled in order. Raises a
    :class:`RemoteValueError`; after one, the buffers may hold part of the value and must not be used.
    """
    header, offset = read_header(data)
    views = _check_expected(header, expect, regions)
    source = _bytes_view(data)[offset:]
    digest = xxhash.xxh3_64()
    position = 0
    for view in views:
        for start in range(0, len(view), _PIECE):
            piece = source[position : position + min(_PIECE, len(view) - start)]
            view[start : start + len(piece)] = piece
            digest.update(piece)
            position += len(piece)
    _check_checksum(header, digest)
    return header


def receive_value(
    length: int, read_exact: Callable[[memoryview], None], expect: ValueHeader, regions: Sequence[memoryview]
) -> ValueHeader:
    """:func:`decode_value` for a value still arriving: ``length`` bytes that ``read_exact(view)``
    delivers in order, filling each view it is given. The header is read and checked first; the
    chunk's bytes then go straight into ``regions`` (no buffer of the whole value, no second copy),
    hashed piece by piece while they are in the CPU cache. Raises as :func:`decode_value`, possibly
    before the value was read to its end: the caller must then drop the stream."""
    if length < PREFIX_BYTES:
        raise TruncatedValueError(f"{length} bytes: shorter than the value's {PREFIX_BYTES}-byte prefix")
    prefix = bytearray(PREFIX_BYTES)
    read_exact(memoryview(prefix))
    offset = PREFIX_BYTES + header_length(prefix)
    if length < offset:
        raise TruncatedValueError(f"{length} bytes: the header alone needs {offset}")
    raw = bytearray(offset - PREFIX_BYTES)
    read_exact(memoryview(raw))
    header = _parse_header(bytes(raw))
    _check_length(header, offset, length)
    views = _check_expected(header, expect, regions)
    digest = xxhash.xxh3_64()
    for view in views:
        for start in range(0, len(view), _PIECE):
            piece = view[start : start + _PIECE]
            read_exact(piece)
            digest.update(piece)
    _check_checksum(header, digest)
    return header


# ---------------------------------------------------------------- block entries


MAX_ENTRY_BLOCKS = 4096  # a block entry never describes more blocks than a chunk can hold
_HEX32 = frozenset("0123456789abcdef")


def encode_block_entry(key_hex: str, block_fps_hex: Sequence[str]) -> str:
    """What a block entry holds: the chunk it belongs to (its key, then every block boundary),
    ``"<key>:<fp>,<fp>,..."``. A reader learns the whole chunk from any one of its blocks, so a
    prompt that shares only part of a chunk can still fill it (and verify the value's header)."""
    return key_hex + ":" + ",".join(block_fps_hex)


def decode_block_entry(raw: str | bytes) -> tuple[str, tuple[str, ...]] | None:
    """``(key, block fingerprints)`` of a block entry, or ``None`` for anything else (planted,
    truncated, another format): a miss, never an error."""
    try:
        text = raw.decode("ascii") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        return None
    key, sep, fps = text.partition(":")
    block_fps = tuple(fps.split(",")) if fps else ()
    if not sep or not block_fps or len(block_fps) > MAX_ENTRY_BLOCKS or block_fps[-1] != key:
        return None
    if not all(len(fp) == 32 and set(fp) <= _HEX32 for fp in block_fps):
        return None
    return key, block_fps


# ---------------------------------------------------------------- pieces


def _check_length(header: ValueHeader, offset: int, length: int) -> None:
    size = offset + header.nbytes
    if length < size:
        raise TruncatedValueError(f"{length} bytes: the value needs {size}")
    if length > size:
        raise CorruptValueError(f"{length} bytes: {length - size} more than the header accounts for")


def _check_expected(header: ValueHeader, expect: ValueHeader, regions: Sequence[memoryview]) -> list[memoryview]:
    """The regions as byte views, once the header is the chunk ``expect`` describes and fits them."""
    if (header.namespace, header.rank, header.key) != (expect.namespace, expect.rank, expect.key):
        raise ForeignValueError(
            f"the value is of chunk {header.namespace[:16]}-{header.rank}-{header.key}, "
            f"not {expect.namespace[:16]}-{expect.rank}-{expect.key}"
        )
    if header.shape != tuple(expect.shape) or (expect.block_fps and header.block_fps != tuple(expect.block_fps)):
        raise ForeignValueError(f"the value's shape {header.shape} or block fingerprints differ from the chunk's")
    views = [_bytes_view(region) for region in regions]
    room = sum(len(view) for view in views)
    if room != header.nbytes:
        raise ValueError(f"the buffers hold {room} bytes; the chunk has {header.nbytes}")
    return views


def _check_checksum(header: ValueHeader, digest: Any) -> None:
    if "xxh3_64:" + digest.hexdigest() != header.checksum:
        raise ChecksumMismatchError("checksum mismatch: the value is corrupt")


def _bytes_view(buffer: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(buffer)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _parse_header(raw: bytes) -> ValueHeader:
    """The JSON header, checked field by field; anything unexpected is :class:`CorruptValueError`."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: deeply nested JSON planted in a value
        raise CorruptValueError(f"the header is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(body, dict):
        raise CorruptValueError("the header is not a JSON object")
    try:
        namespace, rank, key = (_text(body, name) for name in ("namespace", "rank", "key"))
        checksum = _text(body, "checksum")
        block_fps = body["block_fps"]
        shape = body["shape"]
        dtype = body["dtype"]
    except KeyError as exc:
        raise CorruptValueError(f"the header lacks {exc.args[0]!r}") from None
    if dtype != DTYPE:
        raise CorruptValueError(f"the header's dtype is {dtype!r}, not {DTYPE}")
    if not (isinstance(block_fps, list) and all(isinstance(fp, str) for fp in block_fps)):
        raise CorruptValueError("the header's block_fps is not a list of strings")
    if not (isinstance(shape, list) and len(shape) == 3 and all(type(n) is int and 0 <= n < 1 << 40 for n in shape)):
        raise CorruptValueError("the header's shape is not three sizes")
    return ValueHeader(namespace, rank, key, tuple(block_fps), (shape[0], shape[1], shape[2]), checksum)


def _text(body: dict, name: str) -> str:
    value = body[name]
    if not isinstance(value, str):
        raise CorruptValueError(f"the header's {name} is not a string")
    return value
