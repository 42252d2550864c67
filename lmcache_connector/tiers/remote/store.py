"""Worker side of the remote tier: one rank's chunk values, written behind memory and read into it.

Writes never hold up the forward pass. :meth:`RemoteStore.submit_write` puts the chunk on a bounded
queue and returns; a background writer asks the store which of the queued chunks it already holds
(one ``EXISTS`` round trip for the batch: a chunk another engine stored is not sent again) and
writes the others, each as one value (the self-describing header of :mod:`.value`, then the raw
bytes) with the block entries that point to it (written by rank ``tp0pp0`` only): the whole batch
in one ``put_many`` (one pipeline on Redis).
A full queue, or a tier that is down, drops the write at once (counted as ``dropped_writes``): the
chunk's memory slot is released instead of waiting for the network.

Reads (:meth:`read_into`, on the executor's background-fill thread) fetch the value, verify it
against the chunk asked for and copy it into the memory slot. Anything else is a
:class:`~lmcache_connector.tiers.base.ChunkMiss`, never bytes in a slot: a value that is not there
(evicted, expired), not ours, of another format version, truncated or corrupt (counted as
``bad_values``), or a store that does not answer within ``LMCACHE_BLOCKING_TIMEOUT_SECS``.

A failed call marks the tier down for this worker: until a back-off passes (0.5 s, doubling up to
30 s), reads and writes fail at once instead of waiting on a dead store; the first call after it is
the probe. One warning when it goes down, one when a call succeeds again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from lmcache_connector.tiers.base import ChunkMiss, Store, WriteResult
from lmcache_connector.tiers.remote.catalog import ENTRY_RANK
from lmcache_connector.tiers.remote.client import (
    PutItem,
    RemoteClient,
    RemoteError,
    entry_fingerprints,
    side_key,
    value_key,
)
from lmcache_connector.tiers.remote.value import (
    RemoteValueError,
    ValueHeader,
    decode_value,
    encode_block_entry,
    encode_value,
    encode_value_into,
)

logger = logging.getLogger("lmcache_connector")

WRITE_QUEUE_CHUNKS = 32  # chunks waiting for the writer; each keeps its memory slot pinned
WRITE_BATCH = 8  # chunks asked about in one EXISTS round trip
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0


class RemoteStore(Store):
    # A load's chunks are read concurrently: each read waits on the network (an S3 GET is tens of
    # milliseconds), and every client is thread-safe with a pool of connections.
    read_concurrency = 4

    def __init__(
        self,
        client: RemoteClient,
        namespace_hex: str,
        rank: str,
        chunk_shape: Callable[[int], tuple[int, int, int]],
        queue_chunks: int = WRITE_QUEUE_CHUNKS,
    ):
        self.client = client
        self.namespace_hex = namespace_hex
        self.rank = rank
        self._chunk_shape = chunk_shape
        self._prefix = client.key_prefix
        self._jobs: queue.Queue = queue.Queue(maxsize=queue_chunks)
        self._lock = threading.Lock()  # results, counts and the down state: writer, fill and step threads
        self._results: list[WriteResult] = []
        self._counts: dict[str, float] = {}
        self._down_until = 0.0  # monotonic time before which calls fail at once
        self._backoff = BACKOFF_FIRST_S
        self._down_reason: str | None = None
        self._idle = threading.Condition(self._lock)
        self._queued = 0
        self._stop = False
        self._value_buffers: list[bytearray] = []  # the writer thread's, one per chunk of a batch
        self._writer = threading.Thread(target=self._write_loop, name=f"lmcache-remote-writer-{rank}", daemon=True)
        self._writer.start()

    # ------------------------------------------------------------ the contract

    def submit_write(self, job_id: int, key: bytes, block_fps: Sequence[bytes], regions: Sequence[memoryview]) -> None:
        if self._is_down():
            self._drop(job_id)
            return
        with self._lock:
            self._queued += 1
        try:
            self._jobs.put_nowait((job_id, key, tuple(block_fps), list(regions)))
        except queue.Full:
            with self._lock:
                self._queued -= 1
            self._drop(job_id)

    def read_into(self, key: bytes, block_fps: Sequence[bytes], regions: Sequence[memoryview]) -> None:
        if self._is_down():
            raise ChunkMiss(f"the remote tier is down ({self._down_reason})", gone=False)
        expect = self._header(key, block_fps)
        get_into = getattr(self.client, "get_into", None)
        try:
            if get_into is not None:  # straight into the slot, checked as it arrives
                found = get_into(self._value_key(key), expect, regions)
            else:
                data = self.client.get(self._value_key(key))
                found = data is not None
                if found:
                    decode_value(data, expect, regions)
        except RemoteError as exc:
            self._failed(exc)
            raise ChunkMiss(f"reading from the remote tier failed: {exc}", gone=False) from None
        except RemoteValueError as exc:
            self._succeeded()
            self._count("bad_values.remote")
            raise ChunkMiss(f"the remote value is not this chunk's ({type(exc).__name__}: {exc})") from None
        self._succeeded()
        if not found:
            raise ChunkMiss("not in the remote store (evicted or expired)")

    def take_results(self) -> tuple[list[WriteResult], list[bytes]]:
        with self._lock:
            results, self._results = self._results, []
        return results, []

    def take_counts(self) -> dict[str, float]:
        with self._lock:
            counts, self._counts = self._counts, {}
        return counts

    def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._queued:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float) -> None:
        self.flush(timeout)
        self._stop = True
        self._jobs.put(None)
        self._writer.join(timeout=max(timeout, 1.0))
        self.client.close()

    # ------------------------------------------------------------ writer thread

    def _write_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None or self._stop:
                return
            batch = [job]
            while len(batch) < WRITE_BATCH:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._stop = True
                    break
                batch.append(more)
            self._write_batch(batch)
            with self._idle:
                self._queued -= len(batch)
                self._idle.notify_all()

    def _write_batch(self, batch: list[tuple[int, bytes, tuple[bytes, ...], list[memoryview]]]) -> None:
        if self._is_down():
            for job_id, *_ in batch:
                self._drop(job_id)
            return
        try:
            held = self.client.exists_many([self._value_key(key) for _, key, _, _ in batch])
        except RemoteError as exc:
            self._failed(exc)
            for job_id, *_ in batch:
                self._finish(WriteResult(job_id, False))
            return
        items, sent = [], []
        for (job_id, key, block_fps, regions), there in zip(batch, held, strict=True):
            if there:  # another engine (or an earlier write) stored it: nothing to send
                self._finish(WriteResult(job_id, True))
                continue
            try:
                header = self._header(key, block_fps)
                if getattr(self.client, "takes_value_pieces", False):
                    value = encode_value(header, regions)  # sent piece by piece, straight from the slot
                else:
                    value = encode_value_into(header, regions, self._buffer(len(items)))
            except Exception as exc:  # a bug must fail this write, not the writer thread
                logger.warning("Writing chunk %s to the remote tier failed: %s", key.hex()[:12], exc)
                self._finish(WriteResult(job_id, False))
                continue
            entries = (
                [self._entry_key(fp) for fp in entry_fingerprints(block_fps, self.client.entry_every_block)]
                if self.rank == ENTRY_RANK
                else []
            )
            entry = encode_block_entry(key.hex(), [fp.hex() for fp in block_fps])
            items.append(PutItem(self._value_key(key), value, entries, entry))
            sent.append((job_id, header.nbytes))
        if not items:
            return
        started = time.perf_counter()
        try:
            self.client.put_many(items)  # the whole batch in as few round trips as the store allows
        except RemoteError as exc:
            self._failed(exc)
            for job_id, _ in sent:
                self._finish(WriteResult(job_id, False))
            return
        self._succeeded()
        seconds = (time.perf_counter() - started) / len(sent)
        for job_id, nbytes in sent:
            self._finish(WriteResult(job_id, True, nbytes, seconds))

    def _buffer(self, i: int) -> bytearray:
        """The writer's i-th value buffer: reused from batch to batch, so encoding a value copies
        into memory already mapped instead of allocating (and faulting in) a new one each time."""
        while len(self._value_buffers) <= i:
            self._value_buffers.append(bytearray())
        return self._value_buffers[i]

    # ------------------------------------------------------------ pieces

    def _header(self, key: bytes, block_fps: Sequence[bytes]) -> ValueHeader:
        shape = tuple(self._chunk_shape(len(block_fps)))
        return ValueHeader(self.namespace_hex, self.rank, key.hex(), tuple(fp.hex() for fp in block_fps), shape)

    def _value_key(self, key: bytes) -> str:
        return value_key(self._prefix, self.namespace_hex, self.rank, key.hex())

    def _entry_key(self, fp: bytes) -> str:
        return side_key(self._prefix, self.namespace_hex, ENTRY_RANK, fp.hex())

    def _finish(self, result: WriteResult) -> None:
        with self._lock:
            self._results.append(result)

    def _drop(self, job_id: int) -> None:
        self._count("dropped_writes.remote")
        self._finish(WriteResult(job_id, False))

    def _count(self, key: str, amount: float = 1) -> None:
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + amount

    def _is_down(self) -> bool:
        with self._lock:
            return self._down_reason is not None and time.monotonic() < self._down_until

    def _failed(self, exc: RemoteError) -> None:
        with self._lock:
            self._counts["remote_failures"] = self._counts.get("remote_failures", 0) + 1
            if self.client.failures_are_partial:
                return  # one node down costs its own keys; the others keep serving (a dead cluster fails fast)
            if self._down_reason is None:
                logger.warning(
                    "lmcache_connector worker %s: the remote tier %s is down (%s); its reads are misses "
                    "and its writes are dropped until it answers again",
                    self.rank,
                    self.client.url,
                    exc,
                )
                self._backoff = BACKOFF_FIRST_S
            else:
                self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
            self._down_reason = str(exc)
            self._down_until = time.monotonic() + self._backoff

    def _succeeded(self) -> None:
        with self._lock:
            if self._down_reason is None:
                return
            self._down_reason = None
            self._backoff = BACKOFF_FIRST_S
        logger.warning("lmcache_connector worker %s: the remote tier %s is back", self.rank, self.client.url)
