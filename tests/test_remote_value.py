"""A remote value reads back as exactly the chunk that was stored, or as a miss of a named kind, never as code."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from array import array

import pytest

from lmcache_connector.tiers.remote import value as rv
from lmcache_connector.tiers.remote.value import (
    CorruptValueError,
    ForeignValueError,
    OtherVersionError,
    TruncatedValueError,
    ValueHeader,
    decode_value,
    encode_value,
    encode_value_bytes,
    read_header,
)

SHAPE = (2, 3, 64)  # regions, blocks, row bytes
NAMESPACE = "ab" * 16
KEY = "cd" * 16
FPS = ("01" * 16, "02" * 16, KEY)


def _header(**changes) -> ValueHeader:
    fields = {"namespace": NAMESPACE, "rank": "tp0pp0", "key": KEY, "block_fps": FPS, "shape": SHAPE}
    return ValueHeader(**{**fields, **changes})


def _regions(seed: int = 1) -> list[bytearray]:
    regions, blocks, row = SHAPE
    return [bytearray(os.urandom(blocks * row)) if seed else bytearray(blocks * row) for _ in range(regions)]


def _buffers() -> list[memoryview]:
    return [memoryview(bytearray(SHAPE[1] * SHAPE[2])) for _ in range(SHAPE[0])]


def _stored() -> tuple[bytes, list[bytearray]]:
    regions = _regions()
    return encode_value_bytes(_header(), [memoryview(r) for r in regions]), regions


def test_a_value_round_trips_into_the_callers_buffers():
    data, regions = _stored()
    into = _buffers()
    header = decode_value(data, _header(), into)
    assert [bytes(b) for b in into] == [bytes(r) for r in regions]
    assert (header.namespace, header.rank, header.key, header.block_fps, header.shape) == (
        NAMESPACE,
        "tp0pp0",
        KEY,
        FPS,
        SHAPE,
    )
    assert header.checksum.startswith("xxh3_64:")


def test_the_chunk_bytes_are_sent_uncopied_after_a_small_header():
    regions = _regions()
    pieces = encode_value(_header(), [memoryview(r) for r in regions])
    assert len(pieces) == 1 + len(regions)
    assert all(piece.obj is region for piece, region in zip(pieces[1:], regions, strict=True))
    assert len(pieces[0]) < 512  # prefix and JSON header only
    assert b"".join(pieces) == encode_value_bytes(_header(), [memoryview(r) for r in regions])


def test_buffers_of_any_item_type_are_copied_as_raw_bytes():
    floats = [array("f", range(SHAPE[1] * SHAPE[2] // 4)) for _ in range(SHAPE[0])]
    data = encode_value_bytes(_header(), [memoryview(f) for f in floats])
    into = [array("f", bytes(SHAPE[1] * SHAPE[2])) for _ in range(SHAPE[0])]
    decode_value(data, _header(), [memoryview(a) for a in into])
    assert into == floats


def test_the_header_can_be_read_without_the_buffers():
    data, _ = _stored()
    header, offset = read_header(data)
    assert header.nbytes == len(data) - offset and header.block_fps == FPS


@pytest.mark.parametrize(
    "asked",
    [
        {"namespace": "ef" * 16},  # another model, dtype or layout
        {"rank": "tp1pp0"},  # another rank's shard
        {"key": "99" * 16},  # another chunk under this key
        {"shape": (2, 2, 64)},
        {"block_fps": ("03" * 16, "02" * 16, KEY)},
    ],
    ids=["namespace", "rank", "key", "shape", "block_fps"],
)
def test_a_value_of_another_chunk_is_foreign(asked):
    data, _ = _stored()
    with pytest.raises(ForeignValueError):
        decode_value(data, _header(**asked), _buffers())


@pytest.mark.parametrize("planted", [b"", b"x", b"hello world, not a value", b"LMC", json.dumps({"key": KEY}).encode()])
def test_bytes_that_are_not_a_value_of_ours_are_foreign_or_truncated(planted):
    with pytest.raises((ForeignValueError, TruncatedValueError)):
        decode_value(planted, _header(), _buffers())


def test_another_format_version_is_told_apart_before_its_header_is_read():
    data, _ = _stored()
    future = data[:4] + struct.pack("<H", rv.FORMAT_VERSION + 1) + data[6:12] + b"\xff" * 40
    with pytest.raises(OtherVersionError, match="format version 2"):
        decode_value(future, _header(), _buffers())


def test_a_truncated_value_is_truncated_wherever_it_was_cut():
    data, _ = _stored()
    header_end = read_header(data)[1]
    for cut in (4, 11, 12, header_end - 1, header_end, len(data) - 1):
        with pytest.raises(TruncatedValueError):
            decode_value(data[:cut], _header(), _buffers())


def test_a_flipped_bit_in_the_bytes_is_corrupt():
    data = bytearray(_stored()[0])
    data[-100] ^= 0x01
    with pytest.raises(CorruptValueError, match="checksum"):
        decode_value(bytes(data), _header(), _buffers())


def test_trailing_bytes_are_corrupt():
    data, _ = _stored()
    with pytest.raises(CorruptValueError):
        decode_value(data + b"\0", _header(), _buffers())


def _with_header(raw: bytes, length: int | None = None) -> bytes:
    length = len(raw) if length is None else length
    return struct.pack("<4sHHI", rv.MAGIC, rv.FORMAT_VERSION, 0, length) + raw


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"[1, 2, 3]",
        b"[" * 100_000 + b"]" * 100_000,  # nesting deep enough to exhaust the parser's recursion
        json.dumps({"namespace": NAMESPACE}).encode(),
        json.dumps(
            {"namespace": NAMESPACE, "rank": "tp0pp0", "key": KEY, "block_fps": [], "dtype": "U8"}
            | {"shape": [2, "3", 64], "checksum": ""}
        ).encode(),
        json.dumps(
            {"namespace": NAMESPACE, "rank": "tp0pp0", "key": KEY, "block_fps": [], "dtype": "float16"}
            | {"shape": [2, 3, 64], "checksum": ""}
        ).encode(),
        b"\x80\x04\x95" + pickle.dumps(("os", "system")),
    ],
    ids=["not-json", "not-object", "deep-nesting", "missing-fields", "bad-shape", "bad-dtype", "pickle"],
)
def test_a_malformed_header_is_corrupt(raw):
    with pytest.raises(CorruptValueError):
        decode_value(_with_header(raw), _header(), _buffers())


def test_a_header_length_past_the_bound_is_refused_before_anything_is_read():
    with pytest.raises(CorruptValueError, match="over the bound"):
        decode_value(_with_header(b"{}", length=0xFFFFFFFF), _header(), _buffers())


class _Exploit:
    """Unpickling this would create a file: proof that nothing unpickles a value."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_planted_pickle_never_runs(tmp_path):
    marker = tmp_path / "ran"
    payload = pickle.dumps(_Exploit(str(marker)))
    for planted in (payload, _with_header(payload), rv.MAGIC + payload):
        with pytest.raises(rv.RemoteValueError):
            decode_value(planted, _header(), _buffers())
    assert not marker.exists()


def test_regions_that_do_not_match_the_shape_are_a_caller_error():
    with pytest.raises(ValueError, match="the header's shape"):
        encode_value(_header(), [memoryview(bytearray(10))])
    data, _ = _stored()
    with pytest.raises(ValueError, match="the buffers hold"):
        decode_value(data, _header(), [memoryview(bytearray(10))])


def test_the_value_format_imports_neither_torch_nor_vllm_nor_redis():
    code = (
        "import sys, lmcache_connector.tiers.remote.value, lmcache_connector.tiers.remote.redis_client; "
        "print(sorted(m for m in ('torch', 'vllm', 'redis') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_value_encoded_into_a_reused_buffer_is_the_same_value():
    from lmcache_connector.tiers.remote.value import encode_value_into

    buffer = bytearray()
    for seed in (1, 2):  # the second call reuses (and overwrites) the first one's buffer
        header = ValueHeader("ab" * 16, "tp0pp0", "cd" * 16, ("cd" * 16,), (2, 1, 8))
        regions = [memoryview(bytes([seed] * 8)), memoryview(bytes([seed + 1] * 8))]
        assert bytes(encode_value_into(header, regions, buffer)) == encode_value_bytes(header, regions)
