"""Time-to-first-token with lmcache_connector against vLLM's own prefix cache and ExampleConnector.

Three workloads on the bench model (Llama, hidden 1024, 8 layers, 8 KV heads of 64, bf16, block
32: 16 KiB of KV per token), every engine in its own process, one at a time (2 cores):

A. identical prompt (4,000 tokens): cold, then warm from each system;
B. shared documents in the spirit of LMCache's long_doc_qa: 4 documents of ~2,000 tokens (not
   chunk-aligned), each asked 4 different questions, interleaved, with vLLM's KV cache capped so
   it cannot hold all documents; mean TTFT of the question rounds against the cold first round;
C. zero reuse (distinct prompts): TTFT with and without the connector, and the time spent inside
   the connector's hooks as a share of the prefill.

TTFT = wall time of ``generate`` with ``max_tokens=1``; medians where repeated. Results are printed
as ratios to a baseline measured in the same run and written to benchmarks/results/reuse_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_engines import bench_engine  # noqa: E402

from lmcache_connector.testing.tiny_model import BENCH, random_prompt  # noqa: E402
from lmcache_connector.testing.vllm_process import EngineProcess  # noqa: E402

VOCAB = BENCH.vocab_size


def engine(kind: str, tmp: str, capped_blocks: int | None = None) -> EngineProcess:
    return bench_engine(kind, tmp, capped_blocks=capped_blocks)


def identical_prompt(tmp: str, repeats: int) -> dict:
    prompt = random_prompt(4000, seed=1, vocab_size=VOCAB)
    results = {}
    for kind in ("lmcache_connector", "vllm-prefix-cache", "ExampleConnector"):
        with engine(kind, tmp) as e:
            e.call("ttft", prompt=random_prompt(64, seed=99, vocab_size=VOCAB))  # warm-up
            cold = e.call("ttft", prompt=prompt)
            warm = statistics.median(e.call("ttft", prompt=prompt) for _ in range(repeats))
            cached = e.generate([prompt], max_tokens=1)[0]["num_cached_tokens"]
        results[kind] = {"cold_s": cold, "warm_s": warm, "cached_tokens": cached}
        print(f"  A {kind:20} cold {cold:.3f}s  warm {warm:.3f}s  cached {cached}", flush=True)
    return results


def long_doc_qa(tmp: str, docs: int, questions: int, doc_tokens: int) -> dict:
    documents = [random_prompt(doc_tokens + 37 * d, seed=10 + d, vocab_size=VOCAB) for d in range(docs)]
    rounds = [
        [documents[d] + random_prompt(24, seed=1000 * q + d, vocab_size=VOCAB) for d in range(docs)]
        for q in range(questions)
    ]
    capped = int(1.7 * doc_tokens / 32)  # vLLM's own cache holds under two documents
    results = {}
    for kind in ("lmcache_connector", "vllm-prefix-cache", "ExampleConnector"):
        with engine(kind, tmp, capped_blocks=capped) as e:
            e.call("ttft", prompt=random_prompt(64, seed=99, vocab_size=VOCAB))
            first = [e.call("ttft", prompt=p) for p in rounds[0]]
            later = [e.call("ttft", prompt=p) for r in rounds[1:] for p in r]
        cold, query = statistics.mean(first), statistics.mean(later)
        results[kind] = {"first_round_mean_s": cold, "query_mean_s": query, "query_over_cold": query / cold}
        print(
            f"  B {kind:20} first round {cold:.3f}s  question rounds {query:.3f}s  ratio {query / cold:.3f}", flush=True
        )
    return results


def zero_reuse(tmp: str, prompts: int, tokens: int) -> dict:
    distinct = [random_prompt(tokens, seed=5000 + i, vocab_size=VOCAB) for i in range(prompts)]
    results = {}
    for kind in ("none", "lmcache_connector"):
        with engine(kind, tmp) as e:
            e.call("ttft", prompt=random_prompt(64, seed=99, vocab_size=VOCAB))
            if kind != "none":
                e.call("time_connector")
            ttfts = [e.call("ttft", prompt=p) for p in distinct]
            hook_s = e.call("connector_seconds") if kind != "none" else 0.0
        results[kind] = {"ttft_median_s": statistics.median(ttfts), "ttfts": ttfts, "connector_s": hook_s}
    ours, none = results["lmcache_connector"], results["none"]
    share = ours["connector_s"] / sum(ours["ttfts"])
    spread = (max(none["ttfts"]) - min(none["ttfts"])) / none["ttft_median_s"]
    results["connector_share_of_prefill"] = share
    results["ttft_ratio"] = ours["ttft_median_s"] / none["ttft_median_s"]
    results["noise_spread_without_connector"] = spread
    print(
        f"  C connector time {share:.2%} of prefill; TTFT ratio {results['ttft_ratio']:.3f} "
        f"(run-to-run spread without connector {spread:.1%})",
        flush=True,
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--doc-tokens", type=int, default=2000)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "reuse_cpu.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        print("A. identical 4,000-token prompt", flush=True)
        a = identical_prompt(tmp, args.repeats)
        print("B. shared documents (long_doc_qa style), vLLM's KV cache capped", flush=True)
        b = long_doc_qa(tmp, args.docs, args.questions, args.doc_tokens)
        print("C. zero reuse", flush=True)
        c = zero_reuse(tmp, prompts=6, tokens=2000)

    ours_a, apc_a, ex_a = a["lmcache_connector"], a["vllm-prefix-cache"], a["ExampleConnector"]
    print()
    print("Summary (ratios are against a baseline measured in this run)")
    print(
        f"  A warm TTFT: ours {ours_a['warm_s']:.3f}s = {ours_a['warm_s'] / apc_a['warm_s']:.2f}x "
        "vLLM prefix-cache hit "
        f"({apc_a['warm_s']:.3f}s; target <= 1.15x), {ours_a['warm_s'] / ex_a['warm_s']:.2f}x ExampleConnector "
        f"({ex_a['warm_s']:.3f}s), {ours_a['warm_s'] / ours_a['cold_s']:.3f}x cold ({ours_a['cold_s']:.3f}s)"
    )
    for kind, r in b.items():
        print(f"  B question-round TTFT / cold, {kind:20}: {r['query_over_cold']:.3f} (target for ours <= 0.1)")
    print(
        f"  C connector share of prefill {c['connector_share_of_prefill']:.2%} (target <= 3%); "
        f"TTFT with/without {c['ttft_ratio']:.3f} (noise spread {c['noise_spread_without_connector']:.1%})"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"identical_prompt": a, "long_doc_qa": b, "zero_reuse": c}, indent=2))
    print(f"Written to {args.out}")


if __name__ == "__main__":
    main()
