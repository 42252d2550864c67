"""vLLM's KV-cache events for the blocks this connector holds, so that a router sees them.

A router in front of several replicas (llm-d's precise prefix-cache scorer, used by KServe) indexes
vLLM's KV-cache events (``--kv-events-config``): ``BlockStored`` / ``BlockRemoved`` keyed by vLLM's
own block hashes, with a medium. vLLM publishes its GPU blocks itself; this module publishes the
blocks this connector's tiers hold, through the scheduler-side ``take_events`` hook:

* ``BlockStored`` when a tier starts holding a chunk, with vLLM's block hash of each of its blocks
  (``request.block_hashes``: the hashes of vLLM's prefix cache and of its ``GPU`` events), the
  parent hash, the blocks' tokens, LoRA and extra keys as vLLM's own events carry them. Medium
  ``CPU`` for the memory tier (when every rank stored the chunk, or a fill into memory completed),
  ``STORAGE`` for the disk tier (when every rank's file is written, or a scan found the files).
  Chunks hold whole blocks only: a partial last chunk announces its whole blocks.
* ``BlockRemoved`` when a tier stops holding it: evicted, dropped, found bad, or cleared by a cache
  reset, per medium (never vLLM's ``AllBlocksCleared``: it has no medium and would also wipe the
  router's ``GPU`` entries of this replica).
* Per medium, a block is announced once while any chunk holds it (a partial chunk later stored in
  full shares its blocks): stored with its first holder, removed with its last.
* Tiers whose catalog names no ``event_medium`` are not announced: the remote tier is shared by
  every replica (a router scores pods, and any pod can load from it), and Redis or S3 evict without
  telling anyone, so its entries would go stale, which is the failure this module exists to avoid.

After a restart, the disk tier's chunks are announced again from their file headers
(``event_info``, written beside each chunk while events are on), but only when the header's
block-hash settings equal the running engine's: the algorithm (``--prefix-caching-hash-algo``),
``NONE_HASH`` (derived from ``PYTHONHASHSEED``, or a fixed seed for sha256-family algorithms), the
block size and the vLLM version. A chunk written under other settings, or by a version of this
connector that wrote no ``event_info``, is still served, just not announced.

Everything here runs in the scheduler process, which learns of every rank's stores and writes from
the workers' reports: the worker-side event hook (``get_kv_connector_kv_cache_events``) is not
needed. When events are off, this module is never built and nothing costs anything.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm import __version__ as vllm_version
from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVCacheEvent
from vllm.v1.core import kv_cache_utils
from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys, maybe_convert_block_hash, to_event_extra_keys

from lmcache_connector.plan import StepPlan
from lmcache_connector.planner import Planner
from lmcache_connector.tiers.base import HeldChange

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.request import Request

logger = logging.getLogger("lmcache_connector")

EVENT_INFO_VERSION = 1


def kv_events_enabled(vllm_config: VllmConfig) -> bool:
    """Whether vLLM publishes KV-cache events (``--kv-events-config`` with ``enable_kv_cache_events``)."""
    config = getattr(vllm_config, "kv_events_config", None)
    return bool(config is not None and config.enable_kv_cache_events)


@dataclass(frozen=True)
class ChunkBlocks:
    """What vLLM's ``BlockStored`` says about the blocks of one chunk."""

    hashes: tuple[bytes, ...]  # vLLM's block hash of each block, in prompt order
    parent: bytes | None  # the hash of the block before the chunk (None for the first chunk)
    token_ids: tuple[int, ...]  # block_size tokens per block
    block_size: int
    lora_id: int | None = None
    lora_name: str | None = None
    extra_keys: tuple[tuple[Any, ...] | None, ...] | None = None  # one entry per block, as vLLM publishes them

    def hashes_only(self) -> ChunkBlocks:
        """What a removal needs: a chunk held only by a secondary keeps no tokens in this process
        (its ``BlockStored`` is published already; if it comes back to memory, a request brings them)."""
        return ChunkBlocks(self.hashes, self.parent, (), self.block_size)

    def to_json(self, settings: str) -> str:
        return json.dumps(
            {
                "v": EVENT_INFO_VERSION,
                "settings": settings,
                "block_size": self.block_size,
                "hashes": [h.hex() for h in self.hashes],
                "parent": self.parent.hex() if self.parent is not None else None,
                "tokens": list(self.token_ids),
                "lora_id": self.lora_id,
                "lora_name": self.lora_name,
                "extra_keys": self.extra_keys,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str, settings: str) -> ChunkBlocks | None:
        """The blocks described by ``text``, or None when it is missing, malformed or was written
        under other block-hash ``settings`` (its hashes would not be this engine's)."""
        if not text:
            return None
        try:
            info = json.loads(text)
            if info["v"] != EVENT_INFO_VERSION or info["settings"] != settings:
                return None
            block_size = int(info["block_size"])
            hashes = tuple(bytes.fromhex(h) for h in info["hashes"])
            tokens = tuple(int(t) for t in info["tokens"])
            extra = info["extra_keys"]
            if not hashes or len(tokens) != len(hashes) * block_size or (extra and len(extra) != len(hashes)):
                return None
            return cls(
                hashes=hashes,
                parent=bytes.fromhex(info["parent"]) if info["parent"] is not None else None,
                token_ids=tokens,
                block_size=block_size,
                lora_id=info["lora_id"],
                lora_name=info["lora_name"],
                extra_keys=tuple(_tuples(keys) for keys in extra) if extra else None,
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples vLLM's events hold (events are hashed by vLLM's aggregator)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def chunk_blocks(request: Request, first_block: int, num_blocks: int, block_size: int) -> ChunkBlocks | None:
    """The chunk ``[first_block, first_block + num_blocks)`` of ``request``, as vLLM hashes it."""
    end = first_block + num_blocks
    hashes = request.block_hashes
    if num_blocks <= 0 or len(hashes) < end:
        return None
    extra_keys = []
    mm_index = 0
    for block in range(first_block, end):
        keys, mm_index = generate_block_hash_extra_keys(request, block * block_size, (block + 1) * block_size, mm_index)
        extra_keys.append(keys)
    event_keys = to_event_extra_keys(extra_keys)
    lora = request.lora_request
    return ChunkBlocks(
        hashes=tuple(hashes[first_block:end]),
        parent=hashes[first_block - 1] if first_block > 0 else None,
        token_ids=tuple(request.all_token_ids[first_block * block_size : end * block_size]),
        block_size=block_size,
        lora_id=lora.adapter_id if lora is not None else None,
        lora_name=lora.name if lora is not None else None,
        extra_keys=tuple(event_keys) if event_keys else None,
    )


class KVEventAnnouncer:
    """Turns the planner's record of which tier holds which chunk into vLLM's KV-cache events."""

    def __init__(self, vllm_config: VllmConfig, planner: Planner):
        self.planner = planner
        self.block_size = planner.geometry.block_size
        self.hash_algo = vllm_config.cache_config.prefix_caching_hash_algo
        self.media = planner.event_media()  # tier name -> vLLM medium; other tiers are not announced
        self.memory_medium = self.media["memory"]
        self._requests: dict[str, Request] = {}  # admitted and not finished: their hashes and tokens
        self._pending: dict[bytes, ChunkBlocks] = {}  # chunks planned into memory, not held yet
        self._chunks: dict[bytes, ChunkBlocks] = {}  # chunks some announced tier holds
        self._holders: dict[bytes, set[str]] = {}  # chunk -> media it is announced in
        self._counts: dict[str, Counter] = {medium: Counter() for medium in self.media.values()}
        self._events: list[KVCacheEvent] = []
        self._settings: tuple[bytes, str] | None = None  # (NONE_HASH, hash_settings()) last computed
        self.not_announced = 0  # chunks found on disk written under other hash settings, or before events
        planner.track_changes()

    # ------------------------------------------------------------ requests and plans

    def watch(self, request: Request) -> None:
        self._requests[request.request_id] = request

    def forget(self, req_id: str) -> None:
        self._requests.pop(req_id, None)

    def describe_plan(self, plan: StepPlan) -> None:
        """Note vLLM's view of every chunk the plan brings into memory (the requests are alive now,
        not necessarily when the chunk lands), and put it in the stores' ``event_info`` for the
        tiers that keep it."""
        settings = self.hash_settings()
        bs = self.block_size
        for req_id, specs in plan.stores.items():
            request = self._requests.get(req_id)
            for spec in specs:
                count = len(spec.block_ids)
                blocks = chunk_blocks(request, spec.end_block - count, count, bs) if request is not None else None
                if blocks is None:
                    continue
                self._pending[spec.key] = blocks
                if settings is not None and any(tier in self.media for tier in spec.writes):
                    spec.event_info = blocks.to_json(settings)
        fills = plan.fills + [fill for load in plan.async_loads.values() for fill in load.fills]
        for fill in fills:
            request = self._requests.get(fill.req_id)
            blocks = chunk_blocks(request, fill.first_block, len(fill.block_fps), bs) if request is not None else None
            if blocks is not None:
                self._pending[fill.key] = blocks

    def hash_settings(self) -> str | None:
        """What vLLM's block hashes depend on besides the blocks themselves; None before vLLM set
        its ``NONE_HASH`` (the engine core does so after the scheduler, and so the connector, exist)."""
        none_hash = getattr(kv_cache_utils, "NONE_HASH", None)
        if none_hash is None:
            return None
        if self._settings is None or self._settings[0] != none_hash:
            text = f"{self.hash_algo}:{bytes(none_hash).hex()}:{self.block_size}:vllm-{vllm_version}"
            self._settings = (none_hash, text)
        return self._settings[1]

    # ------------------------------------------------------------ events

    def take_events(self) -> list[KVCacheEvent]:
        """Events since the last call, in the order the tiers changed."""
        for tier, change in self.planner.take_changes():
            medium = self.media.get(tier)
            if medium is None:
                continue
            if change.held:
                self._held(tier, medium, change)
            else:
                self._unheld(medium, change.key)
        if self._pending:
            index = self.planner.index
            for key in [key for key in self._pending if key not in index]:
                del self._pending[key]  # its store or fill failed, or a reset dropped it
        events, self._events = self._events, []
        return events

    def _held(self, tier: str, medium: str, change: HeldChange) -> None:
        key = change.key
        holders = self._holders.setdefault(key, set())
        if medium in holders:
            return
        # The freshest description first: the request that stored or filled the chunk (memory), the
        # file header (a scan), then what an other tier's announcement left (this engine's own write).
        blocks = self._pending.pop(key, None) if tier == "memory" else self._pending.get(key)
        if blocks is None and change.event_info:
            settings = self.hash_settings()
            blocks = ChunkBlocks.from_json(change.event_info, settings) if settings is not None else None
        if blocks is None:
            blocks = self._chunks.get(key)
        if blocks is None or not blocks.token_ids:
            self.not_announced += 1
            if not holders:
                del self._holders[key]
            return
        self._chunks[key] = blocks
        holders.add(medium)
        self._stored(medium, blocks)

    def _unheld(self, medium: str, key: bytes) -> None:
        holders = self._holders.get(key)
        if holders is None or medium not in holders:
            return
        holders.discard(medium)
        blocks = self._chunks[key]
        if not holders:
            del self._holders[key]
            del self._chunks[key]
        elif self.memory_medium not in holders:
            self._chunks[key] = blocks.hashes_only()  # tokens are kept for chunks in memory only
        self._removed(medium, blocks)

    def _stored(self, medium: str, blocks: ChunkBlocks) -> None:
        counts = self._counts[medium]
        new = [counts[h] == 0 for h in blocks.hashes]
        counts.update(blocks.hashes)
        bs = blocks.block_size
        start = 0
        while start < len(new):  # one event per run of blocks not announced in this medium yet
            if not new[start]:
                start += 1
                continue
            end = start
            while end < len(new) and new[end]:
                end += 1
            parent = blocks.hashes[start - 1] if start > 0 else blocks.parent
            self._events.append(
                BlockStored(
                    block_hashes=[maybe_convert_block_hash(h) for h in blocks.hashes[start:end]],
                    parent_block_hash=maybe_convert_block_hash(parent) if parent is not None else None,
                    token_ids=list(blocks.token_ids[start * bs : end * bs]),
                    block_size=bs,
                    lora_id=blocks.lora_id,
                    medium=medium,
                    lora_name=blocks.lora_name,
                    extra_keys=list(blocks.extra_keys[start:end]) if blocks.extra_keys else None,
                    group_idx=0,
                )
            )
            start = end

    def _removed(self, medium: str, blocks: ChunkBlocks) -> None:
        counts = self._counts[medium]
        gone = []
        for h in blocks.hashes:
            counts[h] -= 1
            if counts[h] <= 0:
                del counts[h]
                gone.append(h)
        if gone:
            self._events.append(
                BlockRemoved(block_hashes=[maybe_convert_block_hash(h) for h in gone], medium=medium, group_idx=0)
            )

    def state(self) -> dict[str, Any]:
        """For tests and debugging: blocks announced per medium, chunks tracked."""
        return {
            "announced_blocks": {medium: len(counts) for medium, counts in self._counts.items()},
            "chunks": len(self._chunks),
            "pending": len(self._pending),
            "requests": len(self._requests),
            "not_announced": self.not_announced,
        }
