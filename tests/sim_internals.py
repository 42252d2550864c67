"""What the simulation harness reads of the connector beyond vLLM's interface, in one place.

The harness drives the connector through vLLM's interface. At the end of a run it checks the
bookkeeping (pins, in-flight transfers, stored bytes) that the halves publish through their public
``state()``, and fault injection wraps the worker's block mover and disk writer, which the
connector's public ``planner`` and ``executor`` halves expose. Nothing here reads a private name.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


def connector_state(connector: Any) -> dict[str, Any]:
    """The scheduler half's bookkeeping (:meth:`lmcache_connector.planner.Planner.state`), with
    ``entry_bytes``: what the index's entries add up to, recounted."""
    state = dict(connector.state())
    state["entry_bytes"] = state["recounted_bytes"]
    return state


def worker_mover(connector: Any) -> Any:
    """The worker half's block mover (``load(src, block_ids)``, ``store(block_ids, dst, store_id)``);
    None when the worker disabled itself. A missing attribute is an error, not "no faults": fault
    injection that silently does nothing would let every test pass."""
    return connector.executor.mover


def worker_disk(connector: Any) -> Any:
    """The worker half's disk writer (``submit_write``, ``read_into``, ``write_job``, ``path``,
    ``flush``), or None without one."""
    return connector.executor.disk


def settle_disk(connector: Any, timeout: float = 10.0) -> None:
    """Wait until the worker's background disk writer has nothing queued."""
    disk = worker_disk(connector)
    if disk is not None and not disk.flush(timeout):
        raise AssertionError(f"the disk writer was still busy after {timeout} s")


def settle_remote(connector: Any, timeout: float = 10.0) -> None:
    """Wait until the worker's remote-tier writer has nothing queued."""
    store = connector.executor.stores.get("remote")
    if store is not None and not store.flush(timeout):
        raise AssertionError(f"the remote writer was still busy after {timeout} s")


def scheduler_half(connector: Any) -> Any:
    """The object whose methods the SCHEDULER-role connector delegates to (for injecting failures)."""
    return connector.planner


def synchronous_disk_recency(connector: Any, clock: Callable[[], float]) -> None:
    """Make the disk catalog record recency (chunk files' mtimes) at once, from ``clock``, instead of
    from wall time in its background thread: the disk tier's LRU order becomes reproducible."""
    catalog = connector.planner.disk
    if catalog is None or not hasattr(catalog, "file_path"):
        return

    def touch(key: bytes) -> None:
        when = clock()
        for tag in catalog.rank_tags:
            try:
                os.utime(catalog.file_path(tag, key.hex()), (when, when))
            except FileNotFoundError:
                pass

    catalog.touch = touch


def settle_background_fills(connector) -> None:
    """Wait for the worker's background (asynchronous) fills submitted in this step."""
    executor = connector.executor
    if executor is not None and executor.pool is not None:
        executor.wait_background(timeout=30)
