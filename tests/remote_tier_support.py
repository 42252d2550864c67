"""Helpers for testing the remote tier's two halves against a real store, whatever the store.

``test_remote_tier.py`` (Redis), ``test_s3_client.py`` and ``test_lm_client.py`` drive a
:class:`~lmcache_connector.tiers.remote.store.RemoteStore` and a
:class:`~lmcache_connector.tiers.remote.catalog.RemoteCatalog` on their own server: small chunks
(``BPC`` blocks of two regions of ``ROW`` bytes), fingerprints made from a name, and the values a
test plants under a chunk's key to prove that anything but the chunk itself is a miss.
"""

from __future__ import annotations

import os
import time

from lmcache_connector.tiers.base import PENDING
from lmcache_connector.tiers.remote.catalog import RemoteCatalog
from lmcache_connector.tiers.remote.store import RemoteStore
from lmcache_connector.tiers.remote.value import ValueHeader, encode_value_bytes

ROW = 512  # bytes of one block in one region
BPC = 4  # blocks per chunk


def shape(blocks: int) -> tuple[int, int, int]:
    return (2, blocks, ROW)


def fps(seed: str, n: int) -> list[bytes]:
    return [f"{seed}-{i}".encode().ljust(16, b".")[:16] for i in range(n)]


def payload(n_blocks: int, seed: int) -> bytes:
    return bytes((seed + i) % 251 for i in range(2 * n_blocks * ROW))


def write(store: RemoteStore, block_fps: list[bytes], data: bytes, job_id: int = 1) -> None:
    """Write one chunk through the store and wait until it is in the server."""
    store.submit_write(job_id, block_fps[-1], block_fps, [memoryview(data)])
    assert store.flush(10)
    results, _ = store.take_results()
    assert [(r.job_id, r.ok) for r in results] == [(job_id, True)]


def answer(catalog: RemoteCatalog, block_fps: list[bytes], timeout: float = 5.0):
    """``best_piece`` once the catalog heard back from the store."""
    catalog.prefetch(block_fps, BPC)
    deadline = time.monotonic() + timeout
    while True:
        catalog.poll()
        found = catalog.best_piece(block_fps)
        if found is not PENDING:
            return found
        assert time.monotonic() < deadline, "the catalog never heard back"
        time.sleep(0.005)


def planted_values(namespace: str, prompt: list[bytes]) -> dict[str, bytes]:
    """Values that are not the chunk ``prompt`` names, by kind: each must be a counted miss."""

    def value(block_fps: list[bytes], seed: int) -> bytes:
        header = ValueHeader(namespace, "tp0pp0", block_fps[-1].hex(), tuple(f.hex() for f in block_fps), shape(BPC))
        return encode_value_bytes(header, [memoryview(payload(BPC, seed))])

    good = value(prompt, 1)
    return {
        "foreign": value(fps("else", BPC), 2),  # a valid value of another chunk under this chunk's key
        "truncated": good[:-100],
        "corrupt": good[:-1] + bytes([good[-1] ^ 1]),
        "other-version": good[:4] + (99).to_bytes(2, "little") + good[6:],
        "garbage": os.urandom(300),
        "empty": b"",
    }
