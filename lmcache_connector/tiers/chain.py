"""Finding a prompt's longest stored prefix across the memory tier and the disk tier.

Chunk by chunk, the tier whose stored chunk covers more leading blocks wins (memory on a tie: it is
faster and needs no promotion). The prefix ends at the first chunk no tier covers fully.

A chunk found only on disk is promoted into a memory slot to be loaded, so a hit is never promised
that the memory tier cannot stage: the number of promotions is capped by the slots a new chunk
could take *without evicting a chunk this same lookup reads from memory* (those are pinned before
any promotion is made). The prefix is cut before the first promotion over that budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmcache_connector.tiers.disk.catalog import DiskCatalog, DiskEntry
from lmcache_connector.tiers.memory.index import ChunkEntry, ChunkIndex, ChunkState


@dataclass(frozen=True)
class Piece:
    """Blocks ``[0, num_blocks)`` of a stored chunk covering chunk number ``chunk`` of a prompt."""

    chunk: int
    tier: str  # "memory" or "disk"
    entry: ChunkEntry | DiskEntry
    num_blocks: int


def find_pieces(
    fps: list[bytes],
    blocks_per_chunk: int,
    index: ChunkIndex,
    catalog: DiskCatalog | None,
    local_blocks: int = 0,
) -> list[Piece]:
    """The pieces covering the prompt's longest stored prefix. ``local_blocks`` leading blocks vLLM
    already holds: pieces that end inside them are not loaded, so they need no slot."""
    pieces: list[Piece] = []
    for chunk in range((len(fps) + blocks_per_chunk - 1) // blocks_per_chunk):
        block_fps = fps[chunk * blocks_per_chunk : (chunk + 1) * blocks_per_chunk]
        best = None
        in_memory = index.best_piece(block_fps)
        if in_memory is not None:
            best = Piece(chunk, "memory", *in_memory)
        on_disk = catalog.best_piece(block_fps) if catalog is not None else None
        if on_disk is not None and _unpromotable(index, on_disk[0].key):
            on_disk = None
        if on_disk is not None and (best is None or on_disk[1] > best.num_blocks):
            best = Piece(chunk, "disk", *on_disk)
        if best is None:
            break
        pieces.append(best)
        if best.num_blocks < len(block_fps):
            break
    return _within_promotion_budget(pieces, index, blocks_per_chunk, local_blocks)


def _within_promotion_budget(pieces: list[Piece], index: ChunkIndex, bpc: int, local_blocks: int) -> list[Piece]:
    loaded = [i for i, piece in enumerate(pieces) if piece.chunk * bpc + piece.num_blocks > local_blocks]
    promotions = [i for i in loaded if pieces[i].tier == "disk" and pieces[i].entry.key not in index]
    if not promotions:
        return pieces
    own = {pieces[i].entry.key for i in loaded if pieces[i].tier == "memory"}
    budget = index.evictable_slots(excluding=own)
    if len(promotions) <= budget:
        return pieces
    return pieces[: promotions[budget]]


def _unpromotable(index: ChunkIndex, key: bytes) -> bool:
    """A chunk the memory tier holds as DOOMED (pinned, being removed) cannot be promoted again yet."""
    entry = index.get(key)
    return entry is not None and entry.state is ChunkState.DOOMED
