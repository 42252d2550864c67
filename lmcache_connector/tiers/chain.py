"""Finding a prompt's longest stored prefix along the lookup chain: memory, then each secondary.

Chunk by chunk, the tier whose stored chunk covers more leading blocks wins; on a tie the earlier
tier in the chain (memory first: it is fastest and needs no fill; then disk, peer, remote). The
prefix ends at the first chunk no tier covers fully. A catalog that has not heard back yet
(:data:`~lmcache_connector.tiers.base.PENDING`) makes the whole answer pending: the connector asks
vLLM to ask again later rather than promise less than a moment's wait would give. So does a memory
chunk whose asynchronous fill is still running.

A chunk found only in a secondary is filled into a memory slot to be loaded, so a hit is never
promised that the memory tier cannot stage: the number of fills is capped by the slots a new chunk
could take *without evicting a chunk this same lookup reads from memory* (those are pinned before
any fill is made). The prefix is cut before the first fill over that budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lmcache_connector.tiers.base import PENDING, Catalog, StoredChunk, _Pending
from lmcache_connector.tiers.memory.index import ChunkEntry, ChunkIndex, ChunkState


@dataclass(frozen=True)
class Piece:
    """Blocks ``[0, num_blocks)`` of a stored chunk covering chunk number ``chunk`` of a prompt."""

    chunk: int
    tier: str  # "memory" or a secondary's name
    entry: ChunkEntry | StoredChunk
    num_blocks: int


def find_pieces(
    fps: list[bytes],
    blocks_per_chunk: int,
    index: ChunkIndex,
    catalogs: Sequence[Catalog] = (),
    local_blocks: int = 0,
) -> list[Piece] | _Pending:
    """The pieces covering the prompt's longest stored prefix, or PENDING. ``local_blocks`` leading
    blocks vLLM already holds: pieces that end inside them are not loaded, so they need no slot."""
    pieces: list[Piece] = []
    for chunk in range((len(fps) + blocks_per_chunk - 1) // blocks_per_chunk):
        block_fps = fps[chunk * blocks_per_chunk : (chunk + 1) * blocks_per_chunk]
        loaded = chunk * blocks_per_chunk + len(block_fps) > local_blocks
        best = None
        in_memory = index.best_piece(block_fps)
        if in_memory is not None:
            if in_memory[0].filling and loaded:
                return PENDING
            best = Piece(chunk, "memory", *in_memory)
        for catalog in catalogs:
            found = catalog.best_piece(block_fps)
            if found is PENDING:
                if loaded:
                    return PENDING
                continue
            if found is not None and not _unfillable(index, found[0].key):
                if best is None or found[1] > best.num_blocks:
                    best = Piece(chunk, catalog.name, *found)
        if best is None:
            break
        pieces.append(best)
        if best.num_blocks < len(block_fps):
            break
    return _within_fill_budget(pieces, index, blocks_per_chunk, local_blocks)


def _within_fill_budget(pieces: list[Piece], index: ChunkIndex, bpc: int, local_blocks: int) -> list[Piece]:
    loaded = [i for i, piece in enumerate(pieces) if piece.chunk * bpc + piece.num_blocks > local_blocks]
    fills = [i for i in loaded if pieces[i].tier != "memory" and pieces[i].entry.key not in index]
    if not fills:
        return pieces
    own = {pieces[i].entry.key for i in loaded if pieces[i].tier == "memory"}
    budget = index.evictable_slots(excluding=own)
    if len(fills) <= budget:
        return pieces
    return pieces[: fills[budget]]


def _unfillable(index: ChunkIndex, key: bytes) -> bool:
    """A chunk the memory tier holds as DOOMED (pinned, being removed) cannot be filled again yet."""
    entry = index.get(key)
    return entry is not None and entry.state is ChunkState.DOOMED
