"""Fault injection for the simulation harness, and the hooks that watch the worker's byte movement.

:func:`install_hooks` wraps each rank's block mover and disk tier once, at start:

* every load records which blocks it wrote (for violation messages);
* every queued disk write is snapshotted, and checked when the background writer reads its slot
  (a slot must not change while a write of it is queued);
* disk writes are handed to the writer thread only after the step (``submit_deferred_writes``) and
  files get their mtimes from :class:`DiskClock`, so what is reported when, and which file the disk
  tier evicts first, are the same on every run;
* each wrapper consults :class:`Faults`, which tests arm:

* ``fail_next_loads(n)`` / ``fail_next_stores(n)`` — the next ``n`` block copies raise;
* ``fail_next_disk_reads(n)`` — the next ``n`` chunk-file reads raise;
* ``hold_disk_writes(rank)`` / ``release_disk_writes(rank)`` — a slow disk writer on one rank;
* ``delete_disk_files()`` / ``corrupt_disk_files()`` — another engine evicting, or a bad disk;
* ``raise_once(obj, name)`` — make one call of any method raise.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any

from sim_internals import worker_disk, worker_mover

CHUNK_SUFFIX = ".lmc.safetensors"


class InjectedFault(RuntimeError):
    pass


class DiskClock:
    """Simulated wall time for the disk tier's recency (file mtimes), so its least-recently-used
    order is the same on every run: step ``n`` owns ``[n * 1000, n * 1000 + 1000)`` seconds after
    2001, and recency refreshed while scheduling a step sorts before that step's writes."""

    EPOCH = 1_000_000_000

    def __init__(self, sim: Any):
        self.sim = sim
        self._touches = (0, 0)  # (step, touches in it)

    def at(self, order: int) -> float:
        return self.EPOCH + self.sim.step_no * 1000 + order

    def touch(self) -> float:
        step, count = self._touches
        count = count + 1 if step == self.sim.step_no else 0
        self._touches = (self.sim.step_no, count)
        return self.at(min(count, 99))

    def write(self, store_id: int, rank: int) -> float:
        return self.at(100 + 2 * (store_id % 400) + rank)


class Faults:
    def __init__(self, sim: Any):
        self.sim = sim
        self.loads: dict[int | None, int] = {}  # rank (None: any) -> calls left to fail
        self.stores: dict[int | None, int] = {}
        self.disk_reads: dict[int | None, int] = {}
        self.write_gates: dict[int, threading.Event] = {}
        self.deferred_writes: dict[int, list] = {}  # rank -> disk writes queued this step
        self.fired: list[str] = []
        self.clock = DiskClock(sim)

    # ------------------------------------------------------------ arming

    def fail_next_loads(self, n: int = 1, rank: int | None = None) -> None:
        self.loads[rank] = self.loads.get(rank, 0) + n

    def fail_next_stores(self, n: int = 1, rank: int | None = None) -> None:
        self.stores[rank] = self.stores.get(rank, 0) + n

    def fail_next_disk_reads(self, n: int = 1, rank: int | None = None) -> None:
        self.disk_reads[rank] = self.disk_reads.get(rank, 0) + n

    def hold_disk_writes(self, rank: int) -> None:
        """Rank ``rank``'s disk writer stalls before reading its next slot, until released."""
        self.write_gates[rank] = threading.Event()

    def release_disk_writes(self, rank: int) -> None:
        gate = self.write_gates.pop(rank, None)
        if gate is not None:
            gate.set()

    def submit_deferred_writes(self, rank: int) -> None:
        for submit, store_id, header, regions in self.deferred_writes.pop(rank, ()):
            submit(store_id, header, regions)

    def disk_files(self) -> list[Path]:
        folder = self.sim.disk_dir
        return sorted(folder.glob("*" + CHUNK_SUFFIX)) if folder.exists() else []

    def delete_disk_files(self, files: list[Path] | None = None) -> list[Path]:
        """Delete chunk files, as another engine sharing the folder evicting them would."""
        files = self.disk_files() if files is None else files
        for path in files:
            path.unlink(missing_ok=True)
        return files

    def corrupt_disk_files(self, files: list[Path] | None = None) -> list[Path]:
        """Flip the last byte of each file (its KV bytes: the checksum no longer matches)."""
        files = self.disk_files() if files is None else files
        for path in files:
            stat = path.stat()
            data = bytearray(path.read_bytes())
            data[-1] ^= 0xFF
            path.write_bytes(bytes(data))
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # its place in the disk's LRU order
        return files

    def raise_once(self, obj: Any, name: str, calls: int = 1) -> None:
        """The next ``calls`` calls of ``obj.name`` raise :class:`InjectedFault`."""
        original = getattr(obj, name)
        left = [calls]

        def failing(*args, **kwargs):
            if left[0] > 0:
                left[0] -= 1
                self.fired.append(name)
                if left[0] == 0:
                    setattr(obj, name, original)
                raise InjectedFault(f"injected failure of {name}")
            return original(*args, **kwargs)

        setattr(obj, name, failing)

    # ------------------------------------------------------------ consulted by the hooks

    def _take(self, counters: dict[int | None, int], rank: int, what: str) -> bool:
        for key in (rank, None):
            if counters.get(key, 0) > 0:
                counters[key] -= 1
                self.fired.append(f"{what} on rank {rank}")
                return True
        return False


def install_hooks(sim: Any, rank: int, worker: Any) -> None:
    faults: Faults = sim.faults
    mover = worker_mover(worker)
    if mover is not None:
        load, store = mover.load, mover.store

        def hooked_load(src, block_ids, slot=None):
            if faults._take(faults.loads, rank, "load failure"):
                raise InjectedFault("injected load failure")
            load(src, block_ids, slot=slot)
            who = f"a connector load at step {sim.step_no} (rank {rank})"
            sim.ranks[rank].last_writer.update((b, (sim.step_no, who)) for b in block_ids)

        def hooked_store(block_ids, dst, store_id, slot=None):
            if faults._take(faults.stores, rank, "store failure"):
                raise InjectedFault("injected store failure")
            store(block_ids, dst, store_id, slot=slot)

        mover.load, mover.store = hooked_load, hooked_store

    disk = worker_disk(worker)
    if disk is None:
        return
    read_into, submit_write, write = disk.read_into, disk.submit_write, disk.write_job
    queued: dict[int, bytes] = {}

    def hooked_read_into(expect, regions):
        if faults._take(faults.disk_reads, rank, "disk read failure"):
            raise InjectedFault("injected disk read failure")
        read_into(expect, regions)

    def hooked_submit_write(store_id, header, regions):
        # Queued here and handed to the writer after the step (submit_deferred_writes): a write
        # then never finishes in time to be reported in the step that queued it, on any run.
        queued[store_id] = b"".join(bytes(r) for r in regions)
        faults.deferred_writes.setdefault(rank, []).append((submit_write, store_id, header, regions))

    def hooked_write(job):  # runs on the background writer thread
        gate = faults.write_gates.get(rank)
        if gate is not None:
            gate.wait(30)
        before = queued.pop(job.store_id, None)
        if before is not None and b"".join(bytes(r) for r in job.regions) != before:
            sim.async_violations.append(
                f"rank {rank}'s disk writer read the slot of store {job.store_id} (chunk {job.header.key[:12]}) "
                "after it was overwritten: the slot was reused while its disk write was still queued"
            )
        written = write(job)
        # Files get mtimes from the simulation's clock, not the wall clock, so the disk tier's
        # least-recently-used order (by mtime) is the same on every run.
        when = faults.clock.write(job.store_id, rank)
        with contextlib.suppress(FileNotFoundError):
            os.utime(disk.path(job.header.key), (when, when))
        return written

    disk.read_into, disk.submit_write, disk.write_job = hooked_read_into, hooked_submit_write, hooked_write
