"""The disk tier's write cost at steady state: a folder at its bound, every write needing room.

A temporary folder is filled to its bound with ``--files`` chunk files (default 10,000) of the tiny
test model's geometry: a 256-token chunk, 2 layers x K/V x 16 blocks of 2 KiB = 128 KiB plus a
header of under a KiB. Then, in the same run and on the same folder:

* **before**: the eviction of the disk tier before its LRU (commit 51768f8), re-implemented here
  verbatim on top of today's writer (:class:`ListingEveryWrite`: same lock, usage record, reserve,
  fill and rename; only ``_make_room`` differs). At the bound every write lists and stats the whole
  folder under the exclusive lock, sorts it, and deletes the oldest files until the new one fits.
* **after**: today's :class:`~lmcache_connector.tiers.disk.store.DiskTier`, which evicts the oldest
  files it knows in one batch down to ``LOW_WATER`` of the bound (stat'ing each candidate first)
  and lists the folder rarely.

Each mode first writes ``--warmup`` chunks (the after-mode's first write lists the folder, as an
engine's first eviction does), then ``--writes`` timed ones. Per-write time is measured inside the
writer, from checksum to rename (what ``WriteResult.seconds`` reports); also shown: how often the
folder was listed, how many files were evicted, in how many batches, and one listing of the full
folder timed alone (the after-mode pays it once per ``USAGE_MEASURE_S`` and writer at most).

    .venv/bin/python benchmarks/bench_disk_steady.py [--files 10000] [--writes 3000] [--fsync]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lmcache_connector.tiers.disk import store  # noqa: E402
from lmcache_connector.tiers.disk.folder import publish, write_chunk  # noqa: E402
from lmcache_connector.tiers.disk.format import ChunkHeader, parse_file_name, rank_tag  # noqa: E402
from lmcache_connector.tiers.disk.store import DiskTier  # noqa: E402

NS = "ab" * 16
SHAPE = (4, 16, 2048)  # tiny model (2 layers, 2 KV heads of 32, bf16), block 16, chunk 256: 128 KiB
OLD_USAGE_MEASURE_S = 1.0  # the old writer's value


class ListingEveryWrite(DiskTier):
    """The disk tier's eviction before its LRU (commit 51768f8), verbatim."""

    def _make_room(self, size: int) -> tuple[int, float]:
        record = self._load_usage()
        now = time.time()
        if record is not None and 0 <= now - record[1] <= OLD_USAGE_MEASURE_S and record[0] + size <= self.max_bytes:
            return record
        files, usage = self._measure()
        if usage + size > self.max_bytes:
            for _mtime, nbytes, name in sorted(files):  # oldest first
                try:
                    os.unlink(os.path.join(self.folder, name))
                except FileNotFoundError:
                    pass
                usage -= nbytes
                parsed = parse_file_name(name)
                if parsed and parsed[0] == self.namespace_hex[:16]:
                    self._evicted.append(bytes.fromhex(parsed[2]))
                if usage + size <= self.max_bytes:
                    break
        self._store_usage(usage, now)
        return usage, now

    def _publish(self, pending) -> None:
        publish(pending)  # the old rename did not look for a file it replaced


def header(i: int) -> ChunkHeader:
    fps = tuple(f"{i:08x}{b:024x}" for b in range(SHAPE[1]))
    return ChunkHeader(key=fps[-1], namespace=NS, rank=rank_tag(0), block_fps=fps, shape=SHAPE)


def fill_folder(folder: str, files: int, regions: list[memoryview]) -> int:
    """Write ``files`` chunk files, oldest first by mtime; return their bytes with the lock record."""
    total, base = store.RECORD_BYTES, time.time() - files * 0.001 - 60
    for i in range(files):
        total += write_chunk(folder, header(i), regions, fsync=False)
        path = os.path.join(folder, header(i).file_name)
        os.utime(path, (base + i * 0.001, base + i * 0.001))
    os.sync()
    return total


def time_listing(folder: str) -> float:
    tier = DiskTier.__new__(DiskTier)  # only _measure: no writer thread, no lock
    tier.folder = folder
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        tier._measure()
        best = min(best, time.perf_counter() - started)
    return best


class Counting:
    """Folder listings made by the disk writer thread (``os.scandir`` calls on it)."""

    def __init__(self) -> None:
        self.listings = 0
        self._real = os.scandir

    def __enter__(self) -> Counting:
        def scandir(path="."):
            if threading.current_thread().name == "lmcache-disk-writer":
                self.listings += 1
            return self._real(path)

        os.scandir = scandir
        return self

    def __exit__(self, *exc) -> None:
        os.scandir = self._real


def run_mode(cls, folder: str, bound: int, first_key: int, warmup: int, writes: int, fsync: bool, regions) -> dict:
    tier = cls(folder, bound, NS, rank_tag(0), fsync=fsync)
    batches = [0]
    evict = tier._evict

    def counted_evict(usage: int, size: int, goal: int) -> int:
        after = evict(usage, size, goal)
        batches[0] += after < usage
        return after

    tier._evict = counted_evict
    for i in range(first_key, first_key + warmup):
        tier.submit_write(i, header(i), regions)
    assert tier.flush(600)
    tier.take_results()
    batches[0] = 0
    with Counting() as counting:
        started = time.perf_counter()
        for i in range(first_key + warmup, first_key + warmup + writes):
            tier.submit_write(i, header(i), regions)
        assert tier.flush(3600)
        wall = time.perf_counter() - started
    results, evicted = tier.take_results()
    tier.close()
    assert all(r.ok for r in results), "a write failed"
    seconds = sorted(r.seconds for r in results)
    library = sum(e.stat().st_size for e in os.scandir(folder) if ".lmc." in e.name)
    return {
        "mean_ms": 1e3 * statistics.fmean(seconds),
        "p50_ms": 1e3 * seconds[len(seconds) // 2],
        "p99_ms": 1e3 * seconds[min(len(seconds) - 1, int(len(seconds) * 0.99))],
        "max_ms": 1e3 * seconds[-1],
        "wall_ms_per_write": 1e3 * wall / writes,
        "listings": counting.listings,
        "evicted": len(evicted),
        "batches": batches[0] if cls is DiskTier else len(evicted),
        "within_bound": library <= bound,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=10_000, help="chunk files in the full folder")
    parser.add_argument("--writes", type=int, default=3000, help="timed writes with today's tier")
    parser.add_argument("--old-writes", type=int, default=300, help="timed writes with the old eviction")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--fsync", action="store_true", help="fsync every chunk file (the tier's default)")
    parser.add_argument("--dir", default=None, help="where to make the temporary folder (default: the system's)")
    args = parser.parse_args()

    import torch

    data = torch.randint(0, 256, SHAPE, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    regions = [memoryview(r.numpy()).cast("B") for r in data]
    folder = tempfile.mkdtemp(prefix="lmc-steady-", dir=args.dir)
    try:
        print(f"filling {folder} with {args.files} chunk files of {data.numel() // 1024} KiB ...", flush=True)
        bound = fill_folder(folder, args.files, regions)
        listing_ms = 1e3 * time_listing(folder)
        print(f"bound {bound / 2**20:.1f} MiB (the folder as filled); fsync={args.fsync}", flush=True)
        before = run_mode(ListingEveryWrite, folder, bound, 10**6, args.warmup, args.old_writes, args.fsync, regions)
        after = run_mode(DiskTier, folder, bound, 2 * 10**6, args.warmup, args.writes, args.fsync, regions)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    print()
    print(f"{'':24} {'before (list every write)':>26} {'after (LRU, batches)':>22}")
    rows = [
        ("timed writes", args.old_writes, args.writes, "d"),
        ("per write, mean ms", before["mean_ms"], after["mean_ms"], ".3f"),
        ("per write, p50 ms", before["p50_ms"], after["p50_ms"], ".3f"),
        ("per write, p99 ms", before["p99_ms"], after["p99_ms"], ".3f"),
        ("per write, max ms", before["max_ms"], after["max_ms"], ".3f"),
        ("wall ms per write", before["wall_ms_per_write"], after["wall_ms_per_write"], ".3f"),
        ("folder listings", before["listings"], after["listings"], "d"),
        ("files evicted", before["evicted"], after["evicted"], "d"),
        ("eviction batches", before["batches"], after["batches"], "d"),
    ]
    for name, old, new, fmt in rows:
        print(f"{name:24} {old:>26{fmt}} {new:>22{fmt}}")
    print(f"{'within the bound':24} {str(before['within_bound']):>26} {str(after['within_bound']):>22}")
    print()
    print(f"mean per-write time, before / after: {before['mean_ms'] / after['mean_ms']:.1f}x")
    print(
        f"one listing of the full folder alone: {listing_ms:.1f} ms (after: at most once per "
        f"{store.USAGE_MEASURE_S:.0f} s per writer, or when what it knows cannot make room)"
    )


if __name__ == "__main__":
    main()
