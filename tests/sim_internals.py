"""Every read of the connector's private state that the simulation harness needs, in one place.

The harness drives the connector only through vLLM's interface, except for what lives here: the
bookkeeping checked at the end of a run (pins, in-flight transfers, stored bytes), and the worker's
block mover and disk tier, which fault injection wraps. When the connector grows a public API for
one of these (``LMCacheConnector.state()``), switch the function here and nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


def connector_state(connector: Any) -> dict[str, Any]:
    """The scheduler half's bookkeeping: ``pins``, ``inflight``, ``stored_bytes``, ``used_slots``,
    ``entries``, ``tracked_requests``, and ``entry_bytes`` (what the index's entries add up to,
    recounted) when it can be had."""
    if hasattr(connector, "state"):
        state = dict(connector.state())
        if "recounted_bytes" in state:
            state.setdefault("entry_bytes", state["recounted_bytes"])
    else:
        half = connector._scheduler
        index = half.index
        state = {
            "pins": index.pinned,
            "inflight": half.inflight,
            "stored_bytes": index.stored_bytes,
            "used_slots": index.used_slots,
            "entries": len(index),
            "tracked_requests": len(half._requests),
        }
    index = getattr(getattr(connector, "_scheduler", None), "index", None)
    entries = getattr(index, "_entries", None)
    if entries is not None and "entry_bytes" not in state:
        state["entry_bytes"] = sum(e.num_blocks for e in entries.values()) * index.block_bytes
        state["pinned_chunks"] = [(e.key.hex()[:8], e.state.value, e.pins) for e in entries.values() if e.pins]
    return state


def stored_chunk_count(connector: Any) -> dict[str, int]:
    """Chunks the scheduler half believes each tier holds (memory entries, disk catalog entries)."""
    half = connector._scheduler
    disk = getattr(half, "disk", None)
    return {"memory": len(half.index), "disk": len(disk) if disk is not None else 0}


def worker_mover(connector: Any) -> Any:
    """The worker half's block mover (``load(src, block_ids)``, ``store(block_ids, dst, store_id)``);
    None when the worker disabled itself. A missing attribute is an error, not "no faults": fault
    injection that silently does nothing would let every test pass."""
    return connector._worker.mover


def worker_disk(connector: Any) -> Any:
    """The worker half's disk tier (``submit_write``, ``read_into``, ``_write``, ``path``,
    ``flush``), or None without one."""
    return connector._worker.disk


def settle_disk(connector: Any, timeout: float = 10.0) -> None:
    """Wait until the worker's background disk writer has nothing queued."""
    disk = worker_disk(connector)
    if disk is not None and not disk.flush(timeout):
        raise AssertionError(f"the disk writer was still busy after {timeout} s")


def scheduler_half(connector: Any) -> Any:
    """The object whose methods the SCHEDULER-role connector delegates to (for injecting failures)."""
    return connector._scheduler


def synchronous_disk_recency(connector: Any, clock: Callable[[], float]) -> None:
    """Make the disk catalog record recency (chunk files' mtimes) at once, from ``clock``, instead of
    from wall time in its background thread: the disk tier's LRU order becomes reproducible."""
    catalog = getattr(connector._scheduler, "disk", None)
    if catalog is None or not hasattr(catalog, "_path"):
        return

    def touch(key: bytes) -> None:
        when = clock()
        for tag in catalog.rank_tags:
            try:
                os.utime(catalog._path(tag, key.hex()), (when, when))
            except FileNotFoundError:
                pass

    catalog.touch = touch


def settle_background_fills(connector) -> None:
    """Wait for the worker's background (asynchronous) fills submitted in this step."""
    worker = getattr(connector, "_worker", None)
    if worker is not None and worker.pool is not None:
        worker.wait_background(timeout=30)
