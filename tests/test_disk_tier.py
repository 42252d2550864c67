"""The disk tier's files and folder, without an engine: format, verification, size bound, start-up scan."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from engine_support import library_bytes
from safetensors import safe_open

from lmcache_connector.disk_catalog import DiskCatalog
from lmcache_connector.tiers.disk import DiskTier
from lmcache_connector.tiers.disk_format import (
    ChunkFileError,
    ChunkHeader,
    chunk_file_name,
    rank_tag,
    write_chunk,
)

NS = "ab" * 16
OTHER_NS = "cd" * 16
SHAPE = (2, 4, 1024)  # 8 KiB of chunk bytes


def header(i: int, ns: str = NS, blocks: int = 4) -> ChunkHeader:
    fps = tuple(f"{i:08x}{b:024x}" for b in range(blocks))
    return ChunkHeader(key=fps[-1], namespace=ns, rank=rank_tag(0), block_fps=fps, shape=(2, blocks, 1024))


def chunk(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, SHAPE, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def regions(t: torch.Tensor) -> list[memoryview]:
    return [memoryview(r.numpy()).cast("B") for r in t]


def test_chunk_file_is_plain_safetensors(tmp_path):
    data = chunk(1)
    write_chunk(str(tmp_path), header(1), regions(data))
    with safe_open(str(tmp_path / header(1).file_name), "pt") as f:
        assert torch.equal(f.get_tensor("kv"), data)
        assert f.metadata()["format"] == "lmcache_connector.chunk"
        assert f.metadata()["checksum"].startswith("xxh3_64:")


def test_read_verifies_and_removes_corrupt_or_truncated_files(tmp_path):
    tier = DiskTier(str(tmp_path), 1 << 20, NS, rank_tag(0))
    out = torch.empty(SHAPE, dtype=torch.uint8)
    for i, damage in enumerate(["flip", "truncate"]):
        h = header(i)
        write_chunk(str(tmp_path), h, regions(chunk(i)))
        path = tmp_path / h.file_name
        raw = bytearray(path.read_bytes())
        if damage == "flip":
            raw[-100] ^= 0xFF
            path.write_bytes(bytes(raw))
        else:
            path.write_bytes(bytes(raw[:-10]))
        with pytest.raises(ChunkFileError):
            tier.read_into(h, regions(out))
        assert not path.exists(), f"{damage}: a bad file must not stay in the cache"
    good = header(9)
    write_chunk(str(tmp_path), good, regions(chunk(9)))
    tier.read_into(good, regions(out))
    assert torch.equal(out, chunk(9))
    tier.close()


def test_folder_stays_within_its_bound_and_evicts_least_recently_used(tmp_path):
    foreign = tmp_path / "notes.txt"
    foreign.write_text("not ours")
    size = 8192 + 1024  # a chunk file is its bytes plus a small header
    tier = DiskTier(str(tmp_path), max_bytes=5 * size, namespace_hex=NS, rank=rank_tag(0))
    for i in range(12):
        tier.submit_write(i, header(i, ns=NS if i % 2 else OTHER_NS), regions(chunk(i)))
        assert tier.flush(10)
        time.sleep(0.01)  # distinct modification times
        assert library_bytes(tmp_path) <= 5 * size
    results, evicted = tier.take_results()
    assert [r.ok for r in results] == [True] * 12
    names = sorted(os.listdir(tmp_path))
    assert foreign.exists()  # never touched
    assert any(chunk_file_name(NS, rank_tag(0), header(11).key) == n for n in names)  # the newest stays
    assert not any(chunk_file_name(NS, rank_tag(0), header(1).key) == n for n in names)  # the oldest went
    assert header(1).key in {k.hex() for k in evicted}  # reported, so the scheduler forgets it
    tier.close()


WRITER = textwrap.dedent(
    """
    import sys, torch
    from lmcache_connector.tiers.disk import DiskTier
    from lmcache_connector.tiers.disk_format import ChunkHeader, rank_tag
    folder, ns, limit, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    tier = DiskTier(folder, limit, ns, rank_tag(0))
    data = torch.randint(0, 256, (2, 4, 1024), dtype=torch.uint8)
    views = [memoryview(r.numpy()).cast("B") for r in data]
    for i in range(count):
        fps = tuple(f"{i:08x}{b:024x}" for b in range(4))
        tier.submit_write(i, ChunkHeader(fps[-1], ns, rank_tag(0), fps, (2, 4, 1024)), views)
    tier.flush(60)
    results, _ = tier.take_results()
    print(sum(r.ok for r in results), "ok", file=sys.stderr)
    """
)


def test_two_processes_sharing_a_folder_stay_within_one_bound(tmp_path):
    limit = 6 * (8192 + 1024)
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), ns, str(limit), "40"], stderr=subprocess.PIPE)
        for ns in (NS, OTHER_NS)
    ]
    peak = 0
    while any(p.poll() is None for p in procs):
        peak = max(peak, library_bytes(tmp_path))
        time.sleep(0.002)
    for p in procs:
        assert p.wait() == 0, p.stderr.read().decode()
    assert max(peak, library_bytes(tmp_path)) <= limit


FULL_DISK = textwrap.dedent(
    """
    import logging, resource, signal, sys, torch
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # the kernel refuses bigger files: EFBIG
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from lmcache_connector.tiers.disk import DiskTier
    from lmcache_connector.tiers.disk_format import ChunkHeader, rank_tag
    tier = DiskTier(sys.argv[1], 1 << 30, "ab" * 16, rank_tag(0))
    data = torch.zeros((2, 4, 1024), dtype=torch.uint8)
    views = [memoryview(r.numpy()).cast("B") for r in data]
    for i in range(5):
        fps = tuple(f"{i:08x}{b:024x}" for b in range(4))
        tier.submit_write(i, ChunkHeader(fps[-1], "ab" * 16, rank_tag(0), fps, (2, 4, 1024)), views)
    tier.flush(30)
    results, _ = tier.take_results()
    print("results", [r.ok for r in results])
    """
)


def test_a_full_disk_stops_writes_with_one_warning(tmp_path):
    run = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "results [False, False, False, False, False]" in run.stdout
    assert run.stderr.count("disk tier writes stopped") == 1
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".lmc.tmp")]  # nothing half-written left


def test_catalog_rebuilds_from_headers_and_cleans_leftovers(tmp_path):
    for i in range(3):
        write_chunk(str(tmp_path), header(i), regions(chunk(i)))
    write_chunk(str(tmp_path), header(7, ns=OTHER_NS), regions(chunk(7)))  # another model's chunk
    truncated = tmp_path / header(3).file_name
    write_chunk(str(tmp_path), header(3), regions(chunk(3)))
    truncated.write_bytes(truncated.read_bytes()[:100])
    stale = tmp_path / f"{NS[:16]}-tp0pp0-{'0' * 32}.999999999.abcd.lmc.tmp"  # a crashed writer's leftover
    stale.write_bytes(b"x" * 100)
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    (tmp_path / "README").write_text("not ours")

    catalog = DiskCatalog(str(tmp_path), NS, [rank_tag(0)])
    try:
        assert len(catalog) == 3
        for i in range(3):
            fps = [bytes.fromhex(fp) for fp in header(i).block_fps]
            entry, blocks = catalog.best_piece(fps)
            assert blocks == 4
            assert catalog.best_piece(fps[:2])[1] == 2  # every block boundary is indexed
        assert not truncated.exists() and not stale.exists()
        assert (tmp_path / header(7, ns=OTHER_NS).file_name).exists() and (tmp_path / "README").exists()
    finally:
        catalog.close()
