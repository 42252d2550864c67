"""The disk tier's files and folder, without an engine: format, verification, size bound, start-up scan."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from vllm_support import library_bytes

from lmcache_connector.tiers.disk import folder as disk_folder
from lmcache_connector.tiers.disk import format as disk_format
from lmcache_connector.tiers.disk import store as disk
from lmcache_connector.tiers.disk.catalog import DiskCatalog
from lmcache_connector.tiers.disk.folder import write_chunk
from lmcache_connector.tiers.disk.format import (
    ChunkFileError,
    ChunkHeader,
    chunk_file_name,
    rank_tag,
)
from lmcache_connector.tiers.disk.lru import FileLRU
from lmcache_connector.tiers.disk.medium import DiskCatalogTier
from lmcache_connector.tiers.disk.page_cache import is_cached
from lmcache_connector.tiers.disk.store import DiskTier

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


def locked_library_bytes(folder) -> int:
    """The folder's size as a writer sees it: under the writers' lock, so no rename runs mid-listing
    (a listing without it can see a file under its temporary name and again under its final one)."""
    fd = os.open(os.path.join(folder, ".lmc.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return library_bytes(folder)
    finally:
        os.close(fd)


WRITER = textwrap.dedent(
    """
    import sys, torch
    from lmcache_connector.tiers.disk.store import DiskTier
    from lmcache_connector.tiers.disk.format import ChunkHeader, rank_tag
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
        peak = max(peak, locked_library_bytes(tmp_path))
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
    from lmcache_connector.tiers.disk.store import DiskTier
    from lmcache_connector.tiers.disk.format import ChunkHeader, rank_tag
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


def test_a_file_size_limit_stops_writes_with_one_warning(tmp_path):
    run = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "results [False, False, False, False, False]" in run.stdout
    assert run.stderr.count("disk tier writes stopped") == 1
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".lmc.tmp")]  # nothing half-written left


def temp_files(folder) -> list[str]:
    return [n for n in os.listdir(folder) if n.endswith(".lmc.tmp")]


def write_all(tier: DiskTier, first: int, count: int) -> list[bool]:
    for i in range(first, first + count):
        tier.submit_write(i, header(i), regions(chunk(i)))
    assert tier.flush(30)
    return [r.ok for r in tier.take_results()[0]]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_drops_writes_with_one_warning_and_resumes(tmp_path, monkeypatch, caplog, code):
    monkeypatch.setattr(disk, "DISK_FULL_RETRY_S", 0.3)
    real_fallocate, calls, full = os.posix_fallocate, [], [True]

    def fallocate(fd, offset, length):
        calls.append(length)
        if full[0]:
            raise OSError(code, os.strerror(code))
        return real_fallocate(fd, offset, length)

    monkeypatch.setattr(disk_format.os, "posix_fallocate", fallocate)
    tier = DiskTier(str(tmp_path), 1 << 20, NS, rank_tag(0), fsync=False)
    with caplog.at_level(logging.INFO, logger="lmcache_connector"):
        assert write_all(tier, 0, 5) == [False] * 5
        assert len(calls) == 1  # the first failure backs off: the next four are dropped untried
        time.sleep(0.35)
        assert write_all(tier, 5, 2) == [False, False]  # still full after the pause: no new warning
        full[0] = False
        time.sleep(0.35)
        assert write_all(tier, 7, 3) == [True] * 3
        assert write_all(tier, 10, 1) == [True]
    assert tier.disabled_reason is None
    assert caplog.text.count("is full") == 1 and caplog.text.count("writes resumed") == 1
    assert "7 chunk writes dropped" in caplog.text
    assert not temp_files(tmp_path)
    assert len(list(tmp_path.glob("*.lmc.safetensors"))) == 4
    tier.close()


def test_a_disk_full_when_the_engine_starts_is_retried_too(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(disk, "DISK_FULL_RETRY_S", 0.2)
    real_open = os.open

    def no_inodes(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(disk.os, "open", no_inodes)
    tier = DiskTier(str(tmp_path / "cache"), 1 << 20, NS, rank_tag(0), fsync=False)
    with caplog.at_level(logging.INFO, logger="lmcache_connector"):
        assert write_all(tier, 0, 1) == [False]
        monkeypatch.setattr(disk.os, "open", real_open)
        time.sleep(0.25)
        assert write_all(tier, 1, 1) == [True]
    assert tier.disabled_reason is None and caplog.text.count("writes resumed") == 1
    tier.close()


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_read_only_or_forbidden_folder_stops_writes(tmp_path, monkeypatch, caplog, code):
    def fallocate(fd, offset, length):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(disk_format.os, "posix_fallocate", fallocate)
    tier = DiskTier(str(tmp_path), 1 << 20, NS, rank_tag(0), fsync=False)
    with caplog.at_level(logging.WARNING, logger="lmcache_connector"):
        assert write_all(tier, 0, 3) == [False] * 3
    assert tier.disabled_reason is not None and caplog.text.count("disk tier writes stopped") == 1
    tier.submit_write(9, header(9), regions(chunk(9)))  # refused at once, never queued
    assert [r.ok for r in tier.take_results()[0]] == [False]
    tier.close()


FILLER = textwrap.dedent(
    """
    import sys
    with open(sys.argv[1], "wb") as f:  # another program fills the disk
        try:
            while True:
                f.write(b"x" * 4096)
                f.flush()
        except OSError as exc:
            print(exc.errno)
    """
)


@pytest.fixture
def small_tmpfs(tmp_path):
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
            check=True,
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount permission): {exc}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


def test_a_really_full_disk_drops_writes_until_space_is_freed(small_tmpfs, monkeypatch, caplog):
    monkeypatch.setattr(disk, "DISK_FULL_RETRY_S", 0.3)
    folder = small_tmpfs / "cache"
    tier = DiskTier(str(folder), 64 << 20, NS, rank_tag(0))  # a bound far above what the disk holds
    filler = small_tmpfs / "other-program.bin"
    with caplog.at_level(logging.INFO, logger="lmcache_connector"):
        assert write_all(tier, 0, 2) == [True, True]
        run = subprocess.run([sys.executable, "-c", FILLER, str(filler)], capture_output=True, text=True, timeout=60)
        assert run.stdout.strip() == str(errno.ENOSPC), run.stderr
        assert write_all(tier, 2, 3) == [False] * 3
        filler.unlink()  # the other program frees its space
        time.sleep(0.35)
        assert write_all(tier, 5, 3) == [True] * 3
    assert tier.disabled_reason is None
    assert caplog.text.count("is full") == 1 and caplog.text.count("writes resumed") == 1
    assert not temp_files(folder)
    out = torch.empty(SHAPE, dtype=torch.uint8)
    tier.read_into(header(6), regions(out))
    assert torch.equal(out, chunk(6))
    tier.close()


def test_two_tiers_writing_into_one_folder_never_exceed_its_bound(tmp_path):
    """Two ranks (or engines) in one process: each one's figure goes stale while the other writes."""
    size = 8192 + 1024
    limit = 6 * size
    tiers = [DiskTier(str(tmp_path), limit, ns, rank_tag(0), fsync=False) for ns in (NS, OTHER_NS)]
    peak, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], locked_library_bytes(tmp_path))

    watcher = threading.Thread(target=watch)
    watcher.start()
    data = regions(chunk(0))
    try:
        for i in range(60):
            for n, tier in enumerate(tiers):
                tier.submit_write(i, header(i, ns=(NS, OTHER_NS)[n]), data)
        for tier in tiers:
            assert tier.flush(60)
    finally:
        stop.set()
        watcher.join()
    assert max(peak[0], library_bytes(tmp_path)) <= limit
    for tier in tiers:
        assert sum(r.ok for r in tier.take_results()[0]) == 60
        tier.close()


def test_writes_far_from_the_bound_do_not_list_the_folder_each_time(tmp_path, monkeypatch):
    monkeypatch.setattr(disk, "USAGE_MEASURE_S", 60.0)
    listings = []
    measure = DiskTier._measure
    monkeypatch.setattr(DiskTier, "_measure", lambda self: listings.append(1) or measure(self))
    first = DiskTier(str(tmp_path), 1 << 30, NS, rank_tag(0), fsync=False)
    assert write_all(first, 0, 30) == [True] * 30
    second = DiskTier(str(tmp_path), 1 << 30, OTHER_NS, rank_tag(0), fsync=False)  # trusts the shared figure
    assert write_all(second, 30, 10) == [True] * 10
    assert len(listings) == 1
    first.close()
    second.close()


# ---------------------------------------------------------------- steady state: a full folder


def file_bytes() -> int:
    """The size of every chunk file ``header(i)`` makes (fixed-width keys and checksum)."""
    return len(disk_format.encode_header(replace(header(0), checksum="xxh3_64:" + "0" * 16))) + header(0).nbytes


def bound_of(files: int) -> int:
    return files * file_bytes() + disk.RECORD_BYTES  # the lock file counts its usage record


def writer_calls(monkeypatch, name: str) -> list[str]:
    """Paths given to ``os.<name>`` on the disk writers' threads, recorded as the calls happen."""
    calls, real = [], getattr(os, name)

    def counted(path, *args, **kwargs):
        if threading.current_thread().name == "lmcache-disk-writer":
            calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(disk.os, name, counted)
    return calls


def present(folder, ns: str = NS, upto: int = 1000) -> list[int]:
    return [i for i in range(upto) if (Path(folder) / header(i, ns=ns).file_name).exists()]


def write_one(tier: DiskTier, i: int, ns: str = NS) -> set[str]:
    """Write chunk ``i`` and wait for it; the keys the tier reports evicted meanwhile."""
    tier.submit_write(i, header(i, ns=ns), regions(chunk(0)))
    assert tier.flush(10)
    results, evicted = tier.take_results()
    assert [r.ok for r in results] == [True]
    return {k.hex() for k in evicted}


def test_a_full_folder_evicts_in_batches_down_to_a_low_water_mark_without_listing_it(tmp_path, monkeypatch):
    listings = writer_calls(monkeypatch, "scandir")
    tier = DiskTier(str(tmp_path), bound_of(40), NS, rank_tag(0), fsync=False)
    counts, evicted = [], set()
    for i in range(200):
        evicted |= write_one(tier, i)
        assert library_bytes(tmp_path) <= bound_of(40)
        counts.append(len(present(tmp_path, upto=i + 1)))
    low = max(n for n in range(40) if n * file_bytes() + disk.RECORD_BYTES <= disk.LOW_WATER * bound_of(40))
    batch = 40 + 1 - low  # a batch leaves the folder at 90% of its bound, the new file included (35 files)
    drops = [before + 1 - after for before, after in zip(counts, counts[1:], strict=False) if after <= before]
    assert batch >= 4 and drops == [batch] * -(-(200 - 40) // batch)  # 27 batches of 6, not 160 evictions of 1
    assert max(counts) == 40 and min(counts[40:]) == low
    assert len(listings) == 1  # the first write found no usage figure; every eviction used what the tier knew
    kept = present(tmp_path)
    assert kept == list(range(200 - len(kept), 200))  # least recently used first
    assert evicted == {header(i).key for i in range(200)} - {header(i).key for i in kept}  # the scheduler forgets them
    tier.close()


def test_eviction_keeps_a_file_that_another_process_used_since(tmp_path, monkeypatch):
    tier = DiskTier(str(tmp_path), bound_of(10), NS, rank_tag(0), fsync=False)
    for i in range(10):
        write_one(tier, i)
    touch = "import os, sys, time; t = time.time(); os.utime(sys.argv[1], (t, t))"  # the catalog, on a hit
    subprocess.run([sys.executable, "-c", touch, str(tmp_path / header(0).file_name)], check=True, timeout=60)
    listings = writer_calls(monkeypatch, "scandir")
    evicted = write_one(tier, 10)
    assert evicted == {header(i).key for i in (1, 2, 3)}  # a batch of 3, down to 8 files: chunk 0 stays
    assert present(tmp_path) == [0, *range(4, 11)]
    assert not listings  # the tier looked at its oldest files only
    tier.close()


def test_files_another_engine_evicted_are_forgotten(tmp_path, monkeypatch):
    ours = DiskTier(str(tmp_path), bound_of(10), NS, rank_tag(0), fsync=False)
    for i in range(10):
        write_one(ours, i)
    other = DiskTier(str(tmp_path), bound_of(10), OTHER_NS, rank_tag(0), fsync=False)
    for i in range(3):
        assert write_one(other, i, OTHER_NS) == set()  # it removed chunks of ours: not its keys to report
        assert library_bytes(tmp_path) <= bound_of(10)
    gone = [i for i in range(10) if i not in present(tmp_path)]
    assert gone == [0, 1, 2]  # the other engine evicted the folder's oldest files (it listed the folder)
    stats = writer_calls(monkeypatch, "stat")
    evicted = set()
    for i in range(10, 20):
        evicted |= write_one(ours, i)
        assert library_bytes(tmp_path) <= bound_of(10)
    vanished = {str(tmp_path / header(i).file_name) for i in gone}
    assert sorted(p for p in stats if p in vanished) == sorted(vanished)  # looked at once each, then forgotten
    removed = set(range(20)) - set(gone) - set(present(tmp_path, upto=20))
    assert evicted == {header(i).key for i in removed}  # what it removed itself, not what had vanished
    ours.close()
    other.close()


def test_a_folder_full_of_another_engines_files_is_listed_once_and_evicted_oldest_first(tmp_path, monkeypatch):
    other = DiskTier(str(tmp_path), bound_of(20), OTHER_NS, rank_tag(0), fsync=False)
    for i in range(20):
        write_one(other, i, OTHER_NS)
    other.close()  # an engine that stopped: its files are only found by listing the folder
    listings = writer_calls(monkeypatch, "scandir")
    tier = DiskTier(str(tmp_path), bound_of(20), NS, rank_tag(0), fsync=False)
    for i in range(30):
        write_one(tier, i)
        assert library_bytes(tmp_path) <= bound_of(20)
        left = present(tmp_path, OTHER_NS, upto=20)
        assert left == list(range(20 - len(left), 20))  # the other engine's oldest went first
    assert not present(tmp_path, OTHER_NS, upto=20) and present(tmp_path)[-1] == 29
    assert len(listings) == 1  # at the first eviction; it knew every file afterwards
    tier.close()


def test_a_new_writer_evicts_other_engines_older_files_before_its_own(tmp_path):
    other = DiskTier(str(tmp_path), bound_of(10), OTHER_NS, rank_tag(0), fsync=False)
    for i in range(4):
        write_one(other, i, OTHER_NS)
    tier = DiskTier(str(tmp_path), bound_of(10), NS, rank_tag(0), fsync=False)
    for i in range(7):
        write_one(tier, i)
    assert present(tmp_path, OTHER_NS, upto=4) == [3] and present(tmp_path) == list(range(7))  # a batch of 3
    tier.close()
    other.close()


def test_rewriting_a_chunk_does_not_count_it_twice(tmp_path):
    tier = DiskTier(str(tmp_path), bound_of(3), NS, rank_tag(0), fsync=False)
    write_one(tier, 0)
    for _ in range(10):
        assert write_one(tier, 1) == set()  # the rename replaced the old file: the figure says so
    assert present(tmp_path) == [0, 1]
    tier.close()


def test_files_leave_a_cache_folder_only_through_folder_remove(tmp_path):
    for name in (".lmc.lock", "notes.txt", "model.safetensors"):
        (tmp_path / name).write_text("not a chunk")
        with pytest.raises(ValueError):
            disk_folder.remove(str(tmp_path / name))
        assert (tmp_path / name).exists()
    write_chunk(str(tmp_path), header(0), regions(chunk(0)))
    assert disk_folder.remove(str(tmp_path / header(0).file_name)) is True
    assert disk_folder.remove(str(tmp_path / header(0).file_name)) is False  # already gone: not an error
    package = Path(disk.__file__).parents[2]
    deleting = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if path.name != "folder.py" and any(call in path.read_text() for call in ("os.unlink(", "os.remove("))
    ]
    assert not deleting


def test_file_lru_orders_by_mtime_and_follows_what_the_writer_finds():
    lru = FileLRU()
    for name, mtime in (("a", 3.0), ("b", 1.0), ("c", 2.0)):
        lru.add(name, mtime, 10)
    assert lru.oldest() == ("b", 1.0, 10) and lru.bytes == 30
    lru.add("b", 5.0, 12)  # touched since: now the youngest
    assert lru.oldest() == ("c", 2.0, 10) and lru.bytes == 32
    assert lru.discard("c") == 10 and lru.discard("c") == 0
    assert [lru.oldest()[0], len(lru), lru.bytes] == ["a", 2, 22]
    lru.reset([(9.0, 1, "x"), (8.0, 2, "y")])
    assert lru.oldest() == ("y", 8.0, 2) and lru.bytes == 3 and "a" not in lru
    for i in range(5000):  # outdated heap items are dropped, not kept forever
        lru.add("x", 10.0 + i, 1)
    assert len(lru._heap) < 2 * len(lru) + 1100


def test_close_writes_every_queued_chunk(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def slow_fsync(fd):
        time.sleep(0.02)
        real_fsync(fd)

    monkeypatch.setattr(disk_format.os, "fsync", slow_fsync)
    tier = DiskTier(str(tmp_path), 1 << 30, NS, rank_tag(0))
    for i in range(40):
        tier.submit_write(i, header(i), regions(chunk(i)))
    tier.close(60)
    assert [r.ok for r in tier.take_results()[0]] == [True] * 40
    assert len(list(tmp_path.glob("*.lmc.safetensors"))) == 40
    tier.submit_write(99, header(99), regions(chunk(99)))  # after close: refused at once
    assert [r.ok for r in tier.take_results()[0]] == [False]


def test_flush_waits_for_a_write_queued_while_the_writer_goes_idle(tmp_path, monkeypatch):
    """The writer finishes one job and finds the queue empty just before the next job lands in it."""
    real_fsync = os.fsync
    monkeypatch.setattr(disk_format.os, "fsync", lambda fd: time.sleep(0.1) or real_fsync(fd))
    tier = DiskTier(str(tmp_path), 1 << 30, NS, rank_tag(0))
    real_put = tier._jobs.put

    def late_put(job, *args, **kwargs):
        if job is not None and job.store_id == 1:
            time.sleep(0.25)  # job 0 finishes meanwhile, and the writer finds the queue empty
        real_put(job, *args, **kwargs)

    monkeypatch.setattr(tier._jobs, "put", late_put)
    tier.submit_write(0, header(0), regions(chunk(0)))
    submitter = threading.Thread(target=tier.submit_write, args=(1, header(1), regions(chunk(1))))
    submitter.start()
    time.sleep(0.15)  # job 0 is written, job 1 submitted but not yet queued
    assert tier.flush(10)
    assert (tmp_path / header(1).file_name).exists()
    submitter.join()
    tier.close()


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


def test_page_cache_probe_tells_a_warm_file_from_an_evicted_one(tmp_path):
    write_chunk(str(tmp_path), header(1), regions(chunk(1)))  # fsynced: its pages can be dropped
    path = str(tmp_path / header(1).file_name)
    assert is_cached(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert not is_cached(path)
    assert not is_cached(str(tmp_path / "gone.lmc.safetensors"))


@pytest.mark.parametrize("mode", ["auto", True, False])
def test_disk_fills_go_to_the_background_when_the_file_is_cold_or_when_told(tmp_path, mode):
    write_chunk(str(tmp_path), header(1), regions(chunk(1)))
    catalog = DiskCatalogTier(DiskCatalog(str(tmp_path), NS, [rank_tag(0)]), 1 << 30, asynchronous=mode)
    try:
        fps = [bytes.fromhex(fp) for fp in header(1).block_fps]
        stored, _ = catalog.best_piece(fps)
        warm = catalog.fills_asynchronously(stored)
        fd = os.open(str(tmp_path / header(1).file_name), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        cold = catalog.fills_asynchronously(stored)
    finally:
        catalog.close()
    assert (warm, cold) == {"auto": (False, True), True: (True, True), False: (False, False)}[mode]
