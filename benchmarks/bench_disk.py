"""The disk tier: load throughput against a plain read, and time-to-first-token after a restart.

2. Throughput: chunk files of the bench model's geometry (256-token chunks, 8 layers of 8 KV heads of
   64, bf16: 4 MiB each) are written by the disk tier, then read back through it (header check,
   read into a slot, xxh3 checksum) and, in the same run, by a plain sequential ``readinto`` of the
   same files into a preallocated buffer: with the page cache warm, and with it evicted per file
   (``posix_fadvise(DONTNEED)``).
1. TTFT after a restart on the bench model (4,000-token prompt): engine 1 stores, exits; engine 2,
   a new process on the same folder, serves the prompt. Page cache warm, then evicted. Side by side:
   cold prefill, vLLM's own prefix-cache hit (same engine, second request), and vLLM's
   ExampleConnector reloading the prompt after a restart (warm and evicted).

Prints each figure beside its baseline and writes benchmarks/results/disk_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_engines import bench_engine  # noqa: E402

from lmcache_connector.testing.tiny_model import BENCH, random_prompt  # noqa: E402
from lmcache_connector.testing.vllm_process import EngineProcess  # noqa: E402
from lmcache_connector.tiers.disk.format import ChunkHeader, rank_tag  # noqa: E402
from lmcache_connector.tiers.disk.store import DiskTier  # noqa: E402

NS = "ab" * 16
SHAPE = (8, 8, 512 * 1024 // 8)  # 8 layers x 8 blocks x 64 KiB pages: one 256-token chunk of the bench model


def throughput(folder: str, chunks: int) -> dict:
    tier = DiskTier(folder, 1 << 40, NS, rank_tag(0), fsync=True)
    data = torch.randint(0, 256, SHAPE, dtype=torch.uint8)
    headers = []
    for i in range(chunks):
        fps = tuple(f"{i:08x}{b:024x}" for b in range(SHAPE[1]))
        header = ChunkHeader(fps[-1], NS, rank_tag(0), fps, SHAPE)
        headers.append(header)
        tier.submit_write(i, header, [memoryview(r.numpy()).cast("B") for r in data])
    tier.flush(600)
    slot = torch.empty(SHAPE, dtype=torch.uint8)
    regions = [memoryview(r.numpy()).cast("B") for r in slot]
    plain = bytearray(data.numel() + 4096)
    total = chunks * data.numel()
    results = {}
    for cache in ("warm", "evicted"):
        tier_s, plain_s = [], []
        for _ in range(3):
            for order in ("tier", "plain"):
                if cache == "evicted":
                    evict_page_cache_tree(folder)
                started = time.perf_counter()
                if order == "tier":
                    for header in headers:
                        tier.read_into(header, regions)
                    tier_s.append(time.perf_counter() - started)
                else:
                    for header in headers:
                        with open(tier.path(header.key), "rb", buffering=0) as f:
                            f.readinto(plain)
                    plain_s.append(time.perf_counter() - started)
        t, p = statistics.median(tier_s), statistics.median(plain_s)
        results[cache] = {"tier_GBps": total / t / 1e9, "plain_read_GBps": total / p / 1e9, "ratio": p / t}
        print(
            f"  load throughput, page cache {cache:7}: disk tier {total / t / 1e9:6.2f} GB/s  "
            f"plain read {total / p / 1e9:6.2f} GB/s  ratio {p / t:.2f} (target >= 0.7)",
            flush=True,
        )
    tier.close()
    return results


def engine(kind: str, tmp: str, folder: str) -> EngineProcess:
    if kind == "ExampleConnector":
        return bench_engine(kind, tmp, example_folder=folder)
    return bench_engine(kind, tmp, disk_folder=folder or None)


def restart_ttft(tmp: str, repeats: int) -> dict:
    prompt = random_prompt(4000, seed=1, vocab_size=BENCH.vocab_size)
    warmup = random_prompt(64, seed=99, vocab_size=BENCH.vocab_size)
    results = {}
    with engine("vllm-prefix-cache", tmp, "") as e:
        e.call("ttft", prompt=warmup)
        cold = e.call("ttft", prompt=prompt)
        hit = statistics.median(e.call("ttft", prompt=prompt) for _ in range(repeats))
    results["cold_s"], results["vllm_prefix_hit_s"] = cold, hit
    print(f"  cold prefill {cold:.3f}s; vLLM prefix-cache hit {hit:.3f}s", flush=True)
    for kind in ("lmcache_connector", "ExampleConnector"):
        folder = f"{tmp}/{kind}"
        os.makedirs(folder, exist_ok=True)
        with engine(kind, tmp, folder) as e:
            e.call("ttft", prompt=prompt)  # stores
        for cache in ("warm", "evicted"):
            samples = []
            for _ in range(repeats):
                if cache == "evicted":
                    evict_page_cache_tree(folder)
                with engine(kind, tmp, folder) as e:  # a restart: a new process on the same folder
                    e.call("ttft", prompt=warmup)
                    samples.append(e.call("ttft", prompt=prompt))
                    cached = e.generate([prompt], max_tokens=1)[0]["num_cached_tokens"]
            results[f"{kind}_{cache}_s"] = statistics.median(samples)
            print(
                f"  {kind:18} after restart, page cache {cache:7}: {statistics.median(samples):.3f}s "
                f"({cached} tokens cached on the repeat)",
                flush=True,
            )
    return results


def evict_page_cache_tree(folder: str) -> None:
    os.sync()
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=64, help="4 MiB chunk files for the throughput test")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "disk_cpu.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=str(REPO / ".cache")) as tmp:
        # The engines run first: the throughput part leaves hundreds of MiB of fresh page cache and
        # writeback behind, which slowed every engine started after it by up to 2x.
        print("1. TTFT after a restart (bench model, 4,000-token prompt)", flush=True)
        ttft = restart_ttft(tmp, args.repeats)
        print("2. disk-tier load throughput", flush=True)
        tput = throughput(f"{tmp}/tput", args.chunks)
    hit = ttft["vllm_prefix_hit_s"]
    print()
    print("Summary (ratios against baselines measured in this run)")
    for cache in ("warm", "evicted"):
        ours, example = ttft[f"lmcache_connector_{cache}_s"], ttft[f"ExampleConnector_{cache}_s"]
        print(
            f"  page cache {cache:7}: ours {ours:.3f}s = {ours / hit:.2f}x vLLM prefix-cache hit ({hit:.3f}s), "
            f"{ours / example:.2f}x ExampleConnector ({example:.3f}s), {ours / ttft['cold_s']:.3f}x cold"
        )
    for cache, r in tput.items():
        print(f"  load throughput ({cache}): {r['ratio']:.2f}x a plain read")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"throughput": tput, "restart_ttft": ttft}, indent=2))
    print(f"Written to {args.out}")


if __name__ == "__main__":
    main()
