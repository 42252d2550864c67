"""What the remote-store throughput benchmarks share (``bench_remote.py``, ``bench_remote_s3.py``,
``bench_remote_lm.py``): timing named steps, and storing then loading the same chunks through a
:class:`~lmcache_connector.tiers.remote.store.RemoteStore`, checking every write and every byte.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


class Timings:
    """Wall seconds of every run of each named step."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}

    def __call__(self, name: str, run: Callable[[], object]) -> None:
        started = time.perf_counter()
        run()
        self.seconds.setdefault(name, []).append(time.perf_counter() - started)


def time_stores(store, timed: Timings, fps: list[list[bytes]], regions: list, chunk_bytes: int) -> None:
    """``submit_write`` every chunk and ``flush`` (timed as ``store``); each write must have sent its
    bytes: none skipped as already held, dropped or failed."""

    def store_all() -> None:
        for c, block_fps in enumerate(fps):
            store.submit_write(c, block_fps[-1], block_fps, regions[c])
        assert store.flush(600), "the store did not finish its writes"

    timed("store", store_all)
    results, _ = store.take_results()
    written = sorted((r.job_id, r.ok, r.nbytes) for r in results)
    assert written == [(c, True, chunk_bytes) for c in range(len(fps))], "a write was skipped, dropped or failed"


def time_loads(store, timed: Timings, fps: list[list[bytes]], into_regions: list, data: list, into: list) -> None:
    """``read_into`` every chunk (timed as ``load``); the bytes must be the stored ones. ``into`` is
    zeroed afterwards, so the next repeat cannot pass on what this one loaded."""

    def load_all() -> None:
        for c, block_fps in enumerate(fps):
            store.read_into(block_fps[-1], block_fps, into_regions[c])

    timed("load", load_all)
    assert all(torch.equal(a, b) for a, b in zip(data, into, strict=True)), "loaded bytes differ"
    for d in into:
        d.zero_()
