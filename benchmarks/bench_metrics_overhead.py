"""What recording the connector's metrics costs a request, as a share of that request's prefill.

1. A real engine (the bench model: Llama, hidden 1024, 8 layers, bf16, block 32) runs in this
   process (engine core in-process, ``uni`` executor), so both halves of the connector are here.
   While it serves one cold 2,000-token prompt and then the same prompt again (a hit), every
   metrics call is recorded in order: ``Counters.add`` / ``set_gauge`` / ``take`` on the scheduler
   and the worker side.
2. Prefill time: TTFT (``generate`` with ``max_tokens=1``) of fresh 2,000-token prompts (cold) and
   of the repeated one (warm), medians, with the recorder off.
3. Micro-benchmark: the recorded calls are replayed on fresh ``Counters``, and every non-empty
   ``take`` goes down the rest of the way vLLM sends it: ``build_stats``, ``aggregate``,
   ``to_dict``, the front end's ``build_kv_connector_stats``, ``KVConnectorLogging.observe`` and
   ``KVConnectorProm.observe`` into real Prometheus series — once per ``take`` (vLLM merges the two
   halves first and observes once per step, so this over-counts). The worker's two
   ``time.perf_counter()`` calls per timed load or store, which exist only for the metrics, are
   added too. Median of many replays.

Prints the recording cost per request beside the prefill time measured in the same run, and the
share (target: at most 1%).

    .venv/bin/python benchmarks/bench_metrics_overhead.py [--prompt-tokens 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lmcache_connector.testing.tiny_model import BENCH, build_model, random_prompt  # noqa: E402
from lmcache_connector.testing.vllm_process import CONNECTOR, CPU_ENGINE_ENV  # noqa: E402

TIMED_KEYS = ("load_seconds.", "store_seconds.")  # each timed with two perf_counter() calls


# ---------------------------------------------------------------- 1. record the calls


class Recorder:
    """Wraps ``Counters`` methods to log ``(method, instance, args)`` while ``on``."""

    def __init__(self) -> None:
        from lmcache_connector.counters import Counters

        self.calls: list[tuple[str, int, tuple]] = []
        self.on = False
        self._originals = {name: getattr(Counters, name) for name in ("add", "set_gauge", "take")}
        for name, original in self._originals.items():
            setattr(Counters, name, self._wrap(name, original))

    def _wrap(self, name, original):
        @functools.wraps(original)
        def recorded(counters, *args):
            if self.on:
                self.calls.append((name, id(counters), args))
            return original(counters, *args)

        return recorded

    def remove(self) -> None:
        from lmcache_connector.counters import Counters

        for name, original in self._originals.items():
            setattr(Counters, name, original)

    def take_calls(self) -> list[tuple[str, int, tuple]]:
        calls, self.calls = self.calls, []
        return calls


def make_llm(tmp: str):
    os.environ.update({**CPU_ENGINE_ENV, "VLLM_CACHE_ROOT": f"{tmp}/vllm", "VLLM_LOGGING_LEVEL": "WARNING"})
    from vllm import LLM
    from vllm.config import KVTransferConfig

    return LLM(
        model=str(build_model(BENCH, REPO / ".cache" / "models")),
        dtype="bfloat16",
        block_size=32,
        max_model_len=4096,
        max_num_batched_tokens=4096,  # one prefill step for the prompt, as on a GPU server
        enable_prefix_caching=False,  # every reused token comes from the connector
        enforce_eager=True,
        distributed_executor_backend="uni",
        kv_transfer_config=KVTransferConfig(**CONNECTOR, kv_connector_extra_config={"chunk_size": 256}),
    )


def ttft(llm, prompt: list[int], cached: list[int] | None = None) -> float:
    """Seconds to the first token; appends the tokens vLLM took from the connector to ``cached``."""
    from vllm import SamplingParams

    started = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    elapsed = time.perf_counter() - started
    if cached is not None:
        cached.append(out[0].num_cached_tokens or 0)
    return elapsed


# ---------------------------------------------------------------- 3. replay them


def front_end():
    """vLLM's front-end consumers of the stats dict, as its stat loggers build them (private registry)."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from vllm.config import KVTransferConfig, VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorLogging, KVConnectorProm

    registry = CollectorRegistry()

    class Prom(KVConnectorProm):
        _gauge_cls = functools.partial(Gauge, registry=registry)
        _counter_cls = functools.partial(Counter, registry=registry)
        _histogram_cls = functools.partial(Histogram, registry=registry)

    kv_transfer_config = KVTransferConfig(**CONNECTOR)
    prom = Prom(VllmConfig(kv_transfer_config=kv_transfer_config), ["model_name", "engine"], {0: ["bench", "0"]})
    return KVConnectorLogging(kv_transfer_config), prom


def replay(calls: list[tuple[str, int, tuple]], kv_logging, prom) -> float:
    """Seconds to make the recorded calls again and carry every non-empty take to Prometheus."""
    from lmcache_connector.connector import LMCacheConnector
    from lmcache_connector.connector.metrics import build_stats
    from lmcache_connector.counters import Counters

    owners = {owner: Counters() for _, owner, _ in calls}
    perf_counter = time.perf_counter
    started = perf_counter()
    for name, owner, args in calls:
        counters = owners[owner]
        if name == "add":
            if args[0].startswith(TIMED_KEYS):
                perf_counter(), perf_counter()
            counters.add(*args)
        elif name == "set_gauge":
            counters.set_gauge(*args)
        else:
            data = counters.take()
            if data:
                step = build_stats({}).aggregate(build_stats(data))  # worker stats merged with the scheduler's
                sent = step.to_dict()
                LMCacheConnector.build_kv_connector_stats(sent)
                kv_logging.observe(sent)
                prom.observe(sent, 0)
    return perf_counter() - started


def median_replay(calls, kv_logging, prom, rounds: int) -> float:
    replay(calls, kv_logging, prom)  # warm-up
    return statistics.median(replay(calls, kv_logging, prom) for _ in range(rounds))


def describe(calls) -> str:
    adds = sum(name == "add" for name, _, _ in calls)
    gauges = sum(name == "set_gauge" for name, _, _ in calls)
    takes = sum(name == "take" for name, _, _ in calls)
    timed = sum(name == "add" and args[0].startswith(TIMED_KEYS) for name, _, args in calls)
    return f"{adds} add ({timed} timed), {gauges} set_gauge, {takes} take"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3, help="TTFT measurements per case (median)")
    parser.add_argument("--rounds", type=int, default=2000, help="replays per case (median)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        recorder = Recorder()
        llm = make_llm(tmp)
        vocab = BENCH.vocab_size
        ttft(llm, random_prompt(64, seed=99, vocab_size=vocab))  # warm-up

        prompt = random_prompt(args.prompt_tokens, seed=1, vocab_size=vocab)
        recorder.take_calls()
        recorder.on = True
        ttft(llm, prompt)
        miss_calls = recorder.take_calls()
        ttft(llm, prompt)
        hit_calls = recorder.take_calls()
        recorder.on = False
        recorder.remove()

        cold = statistics.median(
            ttft(llm, random_prompt(args.prompt_tokens, seed=100 + i, vocab_size=vocab)) for i in range(args.repeats)
        )
        warm_cached: list[int] = []
        warm = statistics.median(ttft(llm, prompt, warm_cached) for _ in range(args.repeats))

    kv_logging, prom = front_end()
    cases = [("cold request (stores)", miss_calls, cold), ("repeated request (loads)", hit_calls, warm)]
    print(f"bench model, {args.prompt_tokens}-token prompt, chunk 256, block 32; medians")
    print(f"repeated request: {warm_cached} tokens from the connector in its timed runs\n")
    print(f"{'':26} {'metrics calls':38} {'recording':>10} {'prefill (TTFT)':>15} {'share':>8}")
    for label, calls, prefill in cases:
        cost = median_replay(calls, kv_logging, prom, args.rounds)
        print(f"{label:26} {describe(calls):38} {cost * 1e6:8.1f}us {prefill * 1e3:13.1f}ms {cost / prefill:8.3%}")
    print("\ntarget: at most 1% of the request's prefill time")


if __name__ == "__main__":
    main()
