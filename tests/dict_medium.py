"""A secondary medium defined outside the package, for testing the tier contract: chunk bytes in an
in-process dictionary, with a configurable read delay, failure rate and lookup latency.

It is registered like any third-party medium (``LMCACHE_EXTRA_TIERS=dict_medium:DictMedium``) and
proves the contract, not a real tier: hits, misses, stale catalog entries (a chunk deleted behind
the catalog's back), asynchronous fills (``DICT_TIER_ASYNC=1``), failing reads
(``DICT_TIER_FAIL_RATE``), and a catalog that answers "pending" the first ``DICT_TIER_PENDING``
times it is asked about a chunk, like a network lookup in flight. The scheduler half and the
worker halves share the dictionary, so it works in one process (the simulation harness, or a vLLM
engine with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and the ``uni`` executor).
"""

from __future__ import annotations

import os
import random
import threading
import time
import zlib
from collections.abc import Sequence

from lmcache_connector.tiers.base import (
    PENDING,
    Catalog,
    ChunkMiss,
    Medium,
    Store,
    StoredChunk,
    WriteResult,
)

# namespace digest -> rank -> key -> (block fps, bytes of each region)
CHUNKS: dict[str, dict[str, dict[bytes, tuple[tuple[bytes, ...], list[bytes]]]]] = {}
LOCK = threading.Lock()
STATS = {"reads": 0, "failed_reads": 0, "writes": 0, "pending_answers": 0, "reading": 0, "most_reading": 0}


def _settings() -> dict[str, float]:
    return {
        "delay_s": float(os.environ.get("DICT_TIER_DELAY_S", "0")),
        "fail_rate": float(os.environ.get("DICT_TIER_FAIL_RATE", "0")),
        "asynchronous": os.environ.get("DICT_TIER_ASYNC", "0") == "1",
        "pending": int(os.environ.get("DICT_TIER_PENDING", "0")),
        "seed": int(os.environ.get("DICT_TIER_SEED", "0")),
        "read_concurrency": int(os.environ.get("DICT_TIER_READ_CONCURRENCY", "1")),
    }


def forget_everything() -> None:
    with LOCK:
        CHUNKS.clear()
        for key in STATS:
            STATS[key] = 0


def delete_behind_the_catalogs_back(fraction: float = 1.0, seed: int = 0) -> int:
    """Drop stored chunks from the dictionary without telling any catalog: they become stale hits."""
    rng = random.Random(seed)
    dropped = 0
    with LOCK:
        for ranks in CHUNKS.values():
            keys = sorted({k for chunks in ranks.values() for k in chunks})
            for key in keys:
                if rng.random() < fraction:
                    for chunks in ranks.values():
                        chunks.pop(key, None)
                    dropped += 1
    return dropped


class DictMedium(Medium):
    name = "dict"

    def catalog(self, config, geometry) -> Catalog | None:
        ns = geometry.namespace
        ranks = [f"tp{tp}pp{pp}" for tp in range(ns.tp_size) for pp in range(ns.pp_size)]
        return DictCatalog(geometry.namespace.digest().hex(), ranks, _settings())

    def store(self, config, geometry, rank: str, chunk_shape) -> Store | None:
        return DictStore(geometry.namespace.digest().hex(), rank, _settings())


class DictCatalog(Catalog):
    name = "dict"
    hit_source = "external_unspecified"
    order = 40

    def __init__(self, namespace: str, ranks: list[str], settings: dict):
        self.namespace = namespace
        self.ranks = ranks
        self.asynchronous = settings["asynchronous"]
        self._pending = settings["pending"]
        self._asked: dict[bytes, int] = {}
        self._known: dict[bytes, StoredChunk] = {}  # what this catalog was told (may go stale)
        self._by_block: dict[bytes, StoredChunk] = {}

    def best_piece(self, block_fps: Sequence[bytes]):
        for n in range(len(block_fps), 0, -1):
            chunk = self._by_block.get(block_fps[n - 1])
            if chunk is None:
                continue
            asked = self._asked.get(chunk.key, 0)
            if asked < self._pending:  # a lookup "in flight": answer next time
                self._asked[chunk.key] = asked + 1
                STATS["pending_answers"] += 1
                return PENDING
            return chunk, n
        return None

    def __contains__(self, key: bytes) -> bool:
        return key in self._known

    def __len__(self) -> int:
        return len(self._known)

    def stored(self, key: bytes, block_fps: tuple[bytes, ...], nbytes: int) -> None:
        chunk = StoredChunk(key, tuple(block_fps))
        self._known[key] = chunk
        for fp in chunk.block_fps:
            self._by_block[fp] = chunk

    def forget(self, key: bytes) -> None:
        chunk = self._known.pop(key, None)
        if chunk is not None:
            for fp in chunk.block_fps:
                if self._by_block.get(fp) is chunk:
                    del self._by_block[fp]

    def discard(self, key: bytes) -> None:
        self.forget(key)
        with LOCK:
            for chunks in CHUNKS.get(self.namespace, {}).values():
                chunks.pop(key, None)

    def clear(self, in_flight: Sequence[bytes] = ()) -> None:
        for key in list(self._known):
            self.discard(key)

    def usage(self) -> int:
        with LOCK:
            return sum(
                len(b) for chunks in CHUNKS.get(self.namespace, {}).values() for _, bs in chunks.values() for b in bs
            )


class DictStore(Store):
    def __init__(self, namespace: str, rank: str, settings: dict):
        self.namespace = namespace
        self.rank = rank
        self.delay_s = settings["delay_s"]
        self.fail_rate = settings["fail_rate"]
        self.read_concurrency = settings["read_concurrency"]
        self._rng = random.Random(settings["seed"] * 1000 + zlib.crc32(rank.encode()) % 1000)
        self._results: list[WriteResult] = []

    def _chunks(self) -> dict[bytes, tuple[tuple[bytes, ...], list[bytes]]]:
        return CHUNKS.setdefault(self.namespace, {}).setdefault(self.rank, {})

    def submit_write(self, job_id: int, key: bytes, block_fps: Sequence[bytes], regions: Sequence[memoryview]) -> None:
        data = [bytes(region) for region in regions]  # a copy now: the slot may be reused after the result
        with LOCK:
            self._chunks()[key] = (tuple(block_fps), data)
            STATS["writes"] += 1
        self._results.append(WriteResult(job_id, True, sum(len(d) for d in data)))

    def read_into(self, key: bytes, block_fps: Sequence[bytes], regions: Sequence[memoryview]) -> None:
        with LOCK:
            STATS["reading"] += 1
            STATS["most_reading"] = max(STATS["most_reading"], STATS["reading"])
        try:
            self._read_into(key, block_fps, regions)
        finally:
            with LOCK:
                STATS["reading"] -= 1

    def _read_into(self, key: bytes, block_fps: Sequence[bytes], regions: Sequence[memoryview]) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)
        with LOCK:
            STATS["reads"] += 1
            found = self._chunks().get(key)
            failing = self._rng.random() < self.fail_rate
            if failing:
                STATS["failed_reads"] += 1
        if failing:
            raise ChunkMiss("injected read failure", gone=False)
        if found is None:
            raise ChunkMiss("not in the dictionary (deleted behind the catalog's back)")
        stored_fps, data = found
        if stored_fps != tuple(block_fps) or [len(d) for d in data] != [len(r) for r in regions]:
            raise ChunkMiss("another chunk under this key")
        for region, chunk in zip(regions, data, strict=True):
            region[:] = chunk

    def take_results(self) -> tuple[list[WriteResult], list[bytes]]:
        results, self._results = self._results, []
        return results, []
