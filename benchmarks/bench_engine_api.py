"""The engine API on a ``transformers`` model: retrieving a 4,000-token prefix against recomputing it.

The bench model (Llama, hidden 1024, 8 layers, 8 KV heads of 64, bf16: 16 KiB of KV per token),
built locally with random weights, run by ``transformers`` in this process. Measured in one run,
medians of ``--repeats``:

* recompute: a forward of the 4,000-token prefix with ``use_cache=True`` (its ``past_key_values``
  are what a cache hit replaces);
* store: ``KVCache.store`` of those ``past_key_values`` (memory tier; disk written behind it);
* retrieve from memory: ``KVCache.retrieve(prefix, as_cache=True)`` on the cache that stored it;
* retrieve from disk: the same on a new ``KVCache`` over the same folder (an empty memory tier, the
  files in the page cache), so every chunk is read from disk first;
* time to first token of a question after the prefix: recomputing everything, against retrieving
  the prefix (from disk, a new cache) and computing only the question. Opening a cache is not timed.

Printed as ratios to the recompute of the same run; written to benchmarks/results/engine_api_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lmcache_connector.engine import KVCache  # noqa: E402
from lmcache_connector.testing.tiny_model import BENCH, build_model, random_prompt  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "engine_api_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(build_model(BENCH, REPO / ".cache" / "models")).eval()
    prefix = random_prompt(args.tokens, seed=1, vocab_size=BENCH.vocab_size)
    question = random_prompt(24, seed=2, vocab_size=BENCH.vocab_size)
    print(f"bench model, {args.tokens}-token prefix, {args.threads} threads, medians of {args.repeats}", flush=True)

    def forward(ids, past=None):
        with torch.no_grad():
            return model(torch.tensor([ids]), past_key_values=past, use_cache=True)

    forward(prefix[:64])  # warm-up
    recompute_s, out = timed(lambda: forward(prefix), args.repeats)
    kv = out.past_key_values
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            "LMCACHE_MAX_LOCAL_CPU_SIZE": "1",
            "LMCACHE_LOCAL_DISK": tmp,
            "LMCACHE_MAX_LOCAL_DISK_SIZE": "1",
            "LMCACHE_LOG_LEVEL": "WARNING",
        }
        with KVCache.for_model(model, env=env) as cache:
            store_s, stored = timed(lambda: cache.store(prefix, kv), 1)
            memory_s, (hit, _) = timed(lambda: cache.retrieve(prefix, as_cache=True), args.repeats)
            tensors_s, _ = timed(lambda: cache.retrieve(prefix), args.repeats)
        disk_runs = []
        for _ in range(args.repeats):
            with KVCache.for_model(model, env=env) as fresh:
                seconds, (disk_hit, _) = timed(lambda fresh=fresh: fresh.retrieve(prefix, as_cache=True), 1)
                disk_runs.append(seconds)
                tiers = fresh.state()["planner"]["totals"]["hit_tokens_by_tier"]
        disk_s = statistics.median(disk_runs)
        ttft_cold_s, _ = timed(lambda: forward(prefix + question), args.repeats)

        warm_runs = []
        for _ in range(args.repeats):
            with KVCache.for_model(model, env=env) as fresh:  # from disk, as after a restart
                start = time.perf_counter()
                _, past = fresh.retrieve(prefix + question, as_cache=True)
                forward(question, past)
                warm_runs.append(time.perf_counter() - start)
        ttft_warm_s = statistics.median(warm_runs)

    rows = [
        ("recompute the prefix (forward)", recompute_s, args.tokens),
        ("store (memory; disk behind)", store_s, stored),
        ("retrieve from memory, DynamicCache", memory_s, hit),
        ("retrieve from memory, tensors", tensors_s, hit),
        ("retrieve from disk (new cache)", disk_s, disk_hit),
        ("TTFT of a question, recomputed", ttft_cold_s, args.tokens + len(question)),
        ("TTFT of a question, prefix from disk", ttft_warm_s, disk_hit),
    ]
    print(f"{'':40} {'seconds':>9} {'/ recompute':>12} {'tokens':>7}")
    for name, seconds, tokens in rows:
        print(f"{name:40} {seconds:9.4f} {seconds / recompute_s:12.4f} {tokens:7d}")
    print(f"disk retrieve served by: {tiers}")
    result = {
        "model": BENCH.name,
        "prefix_tokens": args.tokens,
        "threads": args.threads,
        "repeats": args.repeats,
        "kv_bytes": hit * 2 * BENCH.num_hidden_layers * BENCH.num_key_value_heads * BENCH.head_dim * 2,
        "seconds": {name: seconds for name, seconds, _ in rows},
        "tokens": {name: tokens for name, _, tokens in rows},
        "retrieve_memory_over_recompute": memory_s / recompute_s,
        "retrieve_disk_over_recompute": disk_s / recompute_s,
        "ttft_warm_over_cold": ttft_warm_s / ttft_cold_s,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
