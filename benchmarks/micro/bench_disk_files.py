"""Chunk files of the disk tier beside plain system calls moving the same bytes, page cache warm.

A call writes or reads 16 chunk files of the bench model's geometry (8 regions x 8 blocks x 64 KiB
= 4 MiB each: 64 MiB, beyond the CPU caches), each from or into a slot of its own, in a folder
under pytest's temporary folder (``--basetemp`` picks another disk).

- write: ``tiers.disk.folder.write_chunk`` (checksum, temporary name, reserve, ``writev``, rename;
  no fsync) against ``os.open`` + ``os.pwritev`` of the same header and regions over a file of
  that size + close. The ceiling overwrites in place: truncating or replacing a file makes ext4
  start writeback on close (``auto_da_alloc``), which would time the disk, not the copy. The peer
  writes a new file, as the tier must: unlink the last one, ``O_CREAT|O_EXCL``, ``writev``, close
  (no checksum, reservation or rename): fresh page-cache pages and blocks, which the ceiling has not;
- read: ``tiers.disk.format.read_chunk_into`` (open, header check, read into the slot's regions,
  xxh3 checksum) against ``os.open`` + ``os.preadv`` of the same bytes into the same regions + close.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
from pairs import measure

from lmcache_connector.tiers.disk.folder import write_chunk
from lmcache_connector.tiers.disk.format import (
    ChunkHeader,
    checksum,
    encode_header,
    rank_tag,
    read_chunk_into,
    read_header,
)

NS = "ab" * 16
SHAPE = (8, 8, 64 * 1024)
FILES = 16


def _regions(tensor: torch.Tensor) -> list[memoryview]:
    return [memoryview(region.numpy()).cast("B") for region in tensor]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The chunk files, written once; their headers; the data written and the slot read into."""
    path = str(tmp_path_factory.mktemp("chunks"))
    data = torch.randint(0, 256, SHAPE, dtype=torch.uint8)
    headers = []
    for i in range(FILES):
        fps = tuple(f"{i:08x}{b:024x}" for b in range(SHAPE[1]))
        header = ChunkHeader(fps[-1], NS, rank_tag(0), fps, SHAPE)
        write_chunk(path, header, _regions(data), fsync=False)
        headers.append(read_header(os.path.join(path, header.file_name))[0])
    slots = torch.empty((FILES, *SHAPE), dtype=torch.uint8)
    return path, headers, data, slots


@pytest.mark.parametrize("role", ["ceiling", "peer", "op"])  # the op last: its ratios need the others
def test_write(benchmark, folder, role):
    path, headers, data, _ = folder
    regions = _regions(data)
    encoded = encode_header(replace(headers[0], checksum=checksum(regions)))
    plain = [os.path.join(path, f"plain-{i}.bin") for i in range(FILES)]
    for name in plain:
        with open(name, "wb") as f:
            f.write(encoded + data.numpy().tobytes())

    def ceiling() -> None:
        for name in plain:
            fd = os.open(name, os.O_WRONLY)
            try:
                os.pwritev(fd, [encoded, *regions], 0)
            finally:
                os.close(fd)

    def peer() -> None:
        for name in plain:
            new = name + ".new"
            if os.path.exists(new):
                os.unlink(new)
            fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.writev(fd, [encoded, *regions])
            finally:
                os.close(fd)

    def op() -> None:
        for header in headers:
            write_chunk(path, header, regions, fsync=False)

    run = {"ceiling": ceiling, "peer": peer, "op": op}[role]
    measure(benchmark, "disk write (warm)", role, run, FILES * data.numel())


@pytest.mark.parametrize("role", ["ceiling", "op"])
def test_read(benchmark, folder, role):
    path, headers, data, slots = folder
    slot_regions = [_regions(slot) for slot in slots]
    names = [os.path.join(path, h.file_name) for h in headers]
    offsets = [read_header(name)[1] for name in names]

    def ceiling() -> None:
        for name, offset, regions in zip(names, offsets, slot_regions, strict=True):
            fd = os.open(name, os.O_RDONLY)
            try:
                got = os.preadv(fd, regions, offset)
            finally:
                os.close(fd)
            assert got == data.numel()

    def op() -> None:
        for name, header, regions in zip(names, headers, slot_regions, strict=True):
            read_chunk_into(name, header, regions)

    measure(benchmark, "disk read (warm)", role, ceiling if role == "ceiling" else op, FILES * data.numel())
    assert all(torch.equal(slot, data) for slot in slots)
