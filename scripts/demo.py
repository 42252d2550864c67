"""Demo: vLLM serving a locally built model with lmcache_connector; cold vs warm time-to-first-token.

vLLM's own prefix cache is turned off here so that every reused token visibly comes from the
connector's CPU-memory tier (in production leave it on: the connector then fills in whatever vLLM's
cache has evicted).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lmcache_connector.testing.tiny_model import BENCH, build_model, random_prompt  # noqa: E402
from lmcache_connector.testing.vllm_process import CONNECTOR, EngineProcess  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3, help="warm measurements (the median is shown)")
    args = parser.parse_args()

    print(f"Building the demo model ({BENCH.name}) under .cache/models (once)...", flush=True)
    model = build_model(BENCH, REPO / ".cache" / "models")
    with tempfile.TemporaryDirectory() as tmp:
        # vLLM logs only warnings here, so the demo's own lines stand out.
        env = {
            "VLLM_CACHE_ROOT": f"{tmp}/vllm",
            "TMPDIR": tmp,
            "LMCACHE_CHUNK_SIZE": "256",
            "VLLM_LOGGING_LEVEL": "WARNING",
        }
        llm_kwargs = {
            "model": str(model),
            "dtype": "bfloat16",
            "max_model_len": 8192,
            "block_size": 32,
            "enable_prefix_caching": False,
            "kv_transfer_config": CONNECTOR,
        }
        print("Starting vLLM (CPU build) with --kv-transfer-config", CONNECTOR, flush=True)
        with EngineProcess(llm_kwargs, env) as engine:
            print(f"Engine started in {engine.start_seconds:.1f} s", flush=True)
            document = random_prompt(args.prompt_tokens, seed=1, vocab_size=BENCH.vocab_size)

            cold = engine.call("ttft", prompt=document)
            warm = [engine.call("ttft", prompt=document) for _ in range(args.repeats)]
            hit = engine.generate([document], max_tokens=1)[0]["num_cached_tokens"]

            question = document + random_prompt(40, seed=2, vocab_size=BENCH.vocab_size)
            shared = engine.generate([question], max_tokens=1)[0]
            shared_ttft = engine.call("ttft", prompt=document + random_prompt(40, seed=3, vocab_size=BENCH.vocab_size))
            state = engine.call("connector_state")

    warm_ttft = statistics.median(warm)
    print()
    print(f"{'':34}{'TTFT':>10}{'tokens from cache':>20}")
    print(f"{'cold (first time)':34}{cold:>9.3f}s{0:>20}")
    print(f"{'warm (same prompt again)':34}{warm_ttft:>9.3f}s{hit:>20}")
    print(f"{'same document, new question':34}{shared_ttft:>9.3f}s{shared['num_cached_tokens']:>20}")
    print()
    print(f"Speed-up of the repeated prompt: {cold / warm_ttft:.1f}x  ({hit} of {len(document)} prompt tokens reused)")
    print(
        f"Memory tier: {state['entries']} chunks, {state['stored_bytes'] / 2**20:.1f} MiB stored "
        f"in {state['used_slots']}/{state['num_slots']} slots; {state['totals']['hit_tokens']} tokens loaded in total"
    )


if __name__ == "__main__":
    main()
