"""Block copies on CPU (the torch path of ``lmcache_connector.ops``) beside ``copy_`` of the same bytes.

The geometry of ``benchmarks/bench_ops_cpu.py``: 8 layers, 8 KV heads, head size 64, bf16,
block 32 tokens, vLLM's CPU layout LBHNC (8 regions of 64 KiB rows), 256-token chunks of 4 MiB.
A call moves 32 chunks (128 MiB) between a 512 MiB cache and 32 preallocated chunk buffers (both
far beyond the CPU caches); the ceiling copies the same number of bytes from a contiguous range
of the same cache into (or out of) the same buffers with ``torch.Tensor.copy_``.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
from pairs import measure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_ops_cpu import BLOCKS_PER_CHUNK, bench_layout  # noqa: E402

from lmcache_connector.ops import gather_blocks, scatter_blocks  # noqa: E402

NUM_BLOCKS = 1024  # 512 MiB
CHUNKS = 32


@pytest.fixture(scope="module")
def setup():
    _, paged = bench_layout(NUM_BLOCKS)
    chunks = torch.empty((CHUNKS, *paged.chunk_shape(BLOCKS_PER_CHUNK)), dtype=torch.uint8)
    chunks.fill_(0xA5)
    rng = random.Random(0)
    stride = NUM_BLOCKS // CHUNKS
    ids = {
        "contiguous": [list(range(c * stride, c * stride + BLOCKS_PER_CHUNK)) for c in range(CHUNKS)],
        "scattered": [rng.sample(range(NUM_BLOCKS), BLOCKS_PER_CHUNK) for _ in range(CHUNKS)],
    }
    return paged, chunks, ids


@pytest.mark.parametrize("pattern", ["contiguous", "scattered"])
@pytest.mark.parametrize("role", ["ceiling", "op"])  # the ceiling first: the op's ratio needs it
def test_gather(benchmark, setup, pattern, role):
    """Paged cache -> chunk buffers (a store)."""
    paged, chunks, ids = setup
    chunk_bytes = chunks[0].numel()
    storage = paged.storage

    def ceiling() -> None:
        for c in range(CHUNKS):
            chunks[c].view(-1).copy_(storage[c * chunk_bytes : (c + 1) * chunk_bytes])

    def op() -> None:
        for c, block_ids in enumerate(ids[pattern]):
            gather_blocks(paged, block_ids, chunks[c])

    measure(benchmark, f"gather {pattern}", role, ceiling if role == "ceiling" else op, CHUNKS * chunk_bytes)


@pytest.mark.parametrize("pattern", ["contiguous", "scattered"])
@pytest.mark.parametrize("role", ["ceiling", "op"])
def test_scatter(benchmark, setup, pattern, role):
    """Chunk buffers -> paged cache (a load)."""
    paged, chunks, ids = setup
    chunk_bytes = chunks[0].numel()
    storage = paged.storage

    def ceiling() -> None:
        for c in range(CHUNKS):
            storage[c * chunk_bytes : (c + 1) * chunk_bytes].copy_(chunks[c].view(-1))

    def op() -> None:
        for c, block_ids in enumerate(ids[pattern]):
            scatter_blocks(chunks[c], paged, block_ids)

    measure(benchmark, f"scatter {pattern}", role, ceiling if role == "ceiling" else op, CHUNKS * chunk_bytes)
