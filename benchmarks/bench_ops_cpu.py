"""CPU block copies (the torch path of lmcache_connector.ops) against a plain ``copy_`` ceiling.

Layout: 8 layers, 8 KV heads, head size 64 (K|V = 128 elements), bf16, block 32 tokens, LBHNC
(vLLM's CPU layout: one region per layer, 64 KiB rows), 256-token chunks (8 blocks, 4 MiB).
Each measurement moves a batch of chunks between a KV cache larger than the CPU caches and a
batch of preallocated chunk buffers; the ceiling is ``copy_`` of the same number of bytes from a
contiguous range of that cache into the same buffers, timed in the same run.

    .venv/bin/python benchmarks/bench_ops_cpu.py [--blocks 2048] [--chunks 32] [--reps 9]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmcache_connector.ops import PagedKV, gather_blocks, scatter_blocks  # noqa: E402

LAYERS, HEADS, HEAD_SIZE, BLOCK_TOKENS, CHUNK_TOKENS = 8, 8, 64, 32, 256
BLOCKS_PER_CHUNK = CHUNK_TOKENS // BLOCK_TOKENS


def bench_layout(num_blocks: int) -> tuple[torch.Tensor, PagedKV]:
    """LBHNC per-layer views over one flat bf16 buffer, as vLLM's CPU runner allocates them."""
    page = HEADS * BLOCK_TOKENS * 2 * HEAD_SIZE  # elements of one layer's block
    flat = torch.empty(LAYERS * num_blocks * page, dtype=torch.bfloat16)
    flat.view(torch.int16).random_(-(2**15), 2**15 - 1)
    views = {
        f"layer{i}": flat[i * num_blocks * page : (i + 1) * num_blocks * page].view(
            num_blocks, HEADS, BLOCK_TOKENS, 2 * HEAD_SIZE
        )
        for i in range(LAYERS)
    }
    return flat, PagedKV.from_layer_views(views)


def median_seconds(fn, reps: int) -> float:
    fn()  # warm-up: page in the destination buffers
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=2048, help="blocks in the KV cache (2048: 1 GiB)")
    parser.add_argument("--chunks", type=int, default=32, help="chunks per measurement (32: 128 MiB)")
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()

    _, paged = bench_layout(args.blocks)
    chunks = torch.empty((args.chunks, *paged.chunk_shape(BLOCKS_PER_CHUNK)), dtype=torch.uint8)
    chunks.fill_(0xA5)
    chunk_bytes = chunks[0].numel()
    total = args.chunks * chunk_bytes
    storage = paged.storage

    rng = random.Random(0)
    stride = args.blocks // args.chunks
    patterns = {
        "contiguous": [list(range(c * stride, c * stride + BLOCKS_PER_CHUNK)) for c in range(args.chunks)],
        "scattered": [rng.sample(range(args.blocks), BLOCKS_PER_CHUNK) for _ in range(args.chunks)],
    }

    def ceiling_in() -> None:
        for c in range(args.chunks):
            chunks[c].view(-1).copy_(storage[c * chunk_bytes : (c + 1) * chunk_bytes])

    def ceiling_out() -> None:
        for c in range(args.chunks):
            storage[c * chunk_bytes : (c + 1) * chunk_bytes].copy_(chunks[c].view(-1))

    print(
        f"CPU block copies, {torch.get_num_threads()} threads; layout LBHNC {LAYERS}L x {HEADS}H x "
        f"{HEAD_SIZE}D bf16, block {BLOCK_TOKENS}, chunk {CHUNK_TOKENS} tokens = {chunk_bytes / 2**20:.0f} MiB "
        f"({paged.num_regions} regions x {BLOCKS_PER_CHUNK} rows of {paged.row_bytes // 1024} KiB); "
        f"{args.chunks} chunks per measurement, median of {args.reps}"
    )
    print(f"{'op':<8} {'block ids':<11} {'GB/s':>7} {'copy_ GB/s':>11} {'ratio':>6}")
    for pattern, id_lists in patterns.items():
        for op in ("gather", "scatter"):
            if op == "gather":

                def run(id_lists=id_lists) -> None:
                    for c, ids in enumerate(id_lists):
                        gather_blocks(paged, ids, chunks[c])

                ceiling = ceiling_in
            else:

                def run(id_lists=id_lists) -> None:
                    for c, ids in enumerate(id_lists):
                        scatter_blocks(chunks[c], paged, ids)

                ceiling = ceiling_out
            # Ceiling and op alternate, best of two medians each, so that drift on a shared
            # machine hits both alike.
            copy_times, op_times = [], []
            for _ in range(2):
                copy_times.append(median_seconds(ceiling, args.reps))
                op_times.append(median_seconds(run, args.reps))
            copy_s, op_s = min(copy_times), min(op_times)
            print(f"{op:<8} {pattern:<11} {total / op_s / 1e9:7.2f} {total / copy_s / 1e9:11.2f} {copy_s / op_s:6.2f}")


if __name__ == "__main__":
    main()
