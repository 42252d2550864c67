"""Finding a prompt's longest stored prefix across the memory tier and the disk tier.

Chunk by chunk, the tier whose stored chunk covers more leading blocks wins (memory on a tie: it is
faster and needs no promotion). The prefix ends at the first chunk no tier covers fully. A chunk
found only on disk is promoted into a memory slot to be loaded, so at most ``max_promotions``
disk chunks are used, as many as the memory tier could free slots for: a hit is never promised that
the memory tier has no room to stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..disk_catalog import DiskCatalog, DiskEntry
from ..index import ChunkEntry, ChunkIndex


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
) -> list[Piece]:
    pieces: list[Piece] = []
    promotions = 0
    max_promotions = None  # counted on first need: it walks the memory index
    for chunk in range((len(fps) + blocks_per_chunk - 1) // blocks_per_chunk):
        block_fps = fps[chunk * blocks_per_chunk : (chunk + 1) * blocks_per_chunk]
        best = None
        in_memory = index.best_piece(block_fps)
        if in_memory is not None:
            best = Piece(chunk, "memory", *in_memory)
        on_disk = catalog.best_piece(block_fps) if catalog is not None else None
        if on_disk is not None and (best is None or on_disk[1] > best.num_blocks):
            if max_promotions is None:
                max_promotions = index.evictable_slots()
            if promotions < max_promotions:
                best = Piece(chunk, "disk", *on_disk)
        if best is None:
            break
        promotions += best.tier == "disk"
        pieces.append(best)
        if best.num_blocks < len(block_fps):
            break
    return pieces
