"""The disk tier behind the tier contract (:mod:`lmcache_connector.tiers.base`).

The scheduler side is the folder's :class:`~lmcache_connector.tiers.disk.catalog.DiskCatalog`; the
worker side is each rank's :class:`~lmcache_connector.tiers.disk.store.DiskTier` writer and reader.
This module only adapts them: it builds each file's header (format, key, namespace, rank, block
fingerprints, shape, and the connector's ``event_info`` when KV-cache events are on) and turns the
file format's errors into misses. Its chunks are announced to routers under vLLM's ``STORAGE``
medium.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict

from lmcache_connector.tiers.base import Catalog, ChunkMiss, HeldChange, Medium, Store, StoredChunk, WriteResult
from lmcache_connector.tiers.disk.catalog import DiskCatalog
from lmcache_connector.tiers.disk.format import ChunkFileError, ChunkHeader, ForeignChunkError, rank_tag
from lmcache_connector.tiers.disk.page_cache import is_cached
from lmcache_connector.tiers.disk.store import DiskTier

logger = logging.getLogger("lmcache_connector")


class DiskMedium(Medium):
    name = "disk"

    def catalog(self, config, geometry) -> Catalog | None:
        if not config.local_disk:
            return None
        ns = geometry.namespace
        tags = [rank_tag(tp, pp) for tp in range(ns.tp_size) for pp in range(ns.pp_size)]
        try:
            folder = DiskCatalog(config.local_disk, ns.digest().hex(), tags, config.disk_rescan_interval_secs)
        except OSError as exc:
            logger.warning("lmcache_connector: disk tier %s unusable (%s); running without it", config.local_disk, exc)
            return None
        logger.info("lmcache_connector: disk tier %s holds %d chunks of this model", config.local_disk, len(folder))
        return DiskCatalogTier(folder, config.max_local_disk_bytes, asynchronous=config.disk_async_fills)

    def store(self, config, geometry, rank: str, chunk_shape) -> Store | None:
        if not config.local_disk:
            return None
        writer = DiskTier(config.local_disk, config.max_local_disk_bytes, geometry.namespace.digest().hex(), rank)
        return DiskStore(writer, geometry, rank, chunk_shape)


class DiskCatalogTier(Catalog):
    name = "disk"
    hit_source = "disk"
    order = 10
    event_medium = "STORAGE"

    def __init__(self, folder: DiskCatalog, max_bytes: int, asynchronous: bool | str = False):
        self.folder = folder
        self.fill_mode = asynchronous  # LMCACHE_DISK_ASYNC_FILLS: True, False or "auto"
        self.asynchronous = asynchronous is not False
        self.max_bytes = max_bytes
        self._writes = True

    def poll(self) -> None:
        self.folder.poll()

    def best_piece(self, block_fps: Sequence[bytes]) -> tuple[StoredChunk, int] | None:
        return self.folder.best_piece(list(block_fps))

    def fills_asynchronously(self, chunk: StoredChunk) -> bool:
        if self.fill_mode != "auto":
            return bool(self.fill_mode)
        # Every rank reads its own file: one cold file would stall the step for all of them.
        return not all(is_cached(self.folder.file_path(tag, chunk.key.hex())) for tag in self.folder.rank_tags)

    def __contains__(self, key: bytes) -> bool:
        return key in self.folder

    def __len__(self) -> int:
        return len(self.folder)

    def touch(self, key: bytes) -> None:
        self.folder.touch(key)

    def accepts_writes(self) -> bool:
        return self._writes

    def writes_stopped(self) -> None:
        self._writes = False  # the worker logged why; loads from disk go on

    def stored(self, key: bytes, block_fps: tuple[bytes, ...], nbytes: int) -> None:
        self.folder.add(key, block_fps, nbytes)

    def forget(self, key: bytes) -> None:
        self.folder.remove(key)

    def discard(self, key: bytes) -> None:
        self.folder.delete(key)  # every rank's file; unbans the key once done

    def clear(self, in_flight: Sequence[bytes] = ()) -> None:
        self.folder.clear(list(in_flight))

    def usage(self) -> int:
        return self.folder.used_bytes

    def track_changes(self) -> None:
        self.folder.track_changes()

    def take_changes(self) -> list[HeldChange]:
        changes = []
        for key, held, info in self.folder.take_changes():
            entry = self.folder.get(key) if held else None
            changes.append(HeldChange(key, held, info, entry.block_fps if entry is not None else ()))
        return changes

    def capacity(self) -> int:
        return self.max_bytes

    def close(self) -> None:
        self.folder.close()


class DiskStore(Store):
    keeps_event_info = True  # in the file header

    def __init__(self, writer: DiskTier, geometry, rank: str, chunk_shape):
        self.writer = writer
        self.rank = rank
        self._namespace = geometry.namespace.digest().hex()
        self._namespace_info = json.dumps(asdict(geometry.namespace), sort_keys=True)
        self._chunk_shape = chunk_shape

    def _header(self, key: bytes, block_fps: Sequence[bytes], event_info: str = "") -> ChunkHeader:
        return ChunkHeader(
            key=key.hex(),
            namespace=self._namespace,
            rank=self.rank,
            block_fps=tuple(fp.hex() for fp in block_fps),
            shape=self._chunk_shape(len(block_fps)),
            namespace_info=self._namespace_info,
            event_info=event_info,
        )

    def submit_write(
        self,
        job_id: int,
        key: bytes,
        block_fps: Sequence[bytes],
        regions: Sequence[memoryview],
        event_info: str = "",
    ) -> None:
        self.writer.submit_write(job_id, self._header(key, block_fps, event_info), regions)

    def read_into(self, key: bytes, block_fps: Sequence[bytes], regions: Sequence[memoryview]) -> None:
        try:
            self.writer.read_into(self._header(key, block_fps), regions)
        except ForeignChunkError as exc:  # another format version: never ours to load
            raise ChunkMiss(str(exc), gone=True) from exc
        except ChunkFileError as exc:  # missing, truncated or corrupt (a corrupt file is deleted)
            raise ChunkMiss(str(exc), gone=True) from exc

    def take_results(self) -> tuple[list[WriteResult], list[bytes]]:
        results, evicted = self.writer.take_results()
        return [WriteResult(r.store_id, r.ok, r.nbytes, r.seconds) for r in results], list(evicted)

    def writes_stopped(self) -> bool:
        return self.writer.disabled_reason is not None

    def flush(self, timeout: float) -> bool:
        return self.writer.flush(timeout)

    def close(self, timeout: float) -> None:
        self.writer.close(timeout)
