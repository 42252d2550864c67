"""The remote tier on Redis: throughput against raw redis-py, warm TTFT from Redis, a two-engine chat.

One redis-server (Debian's, started on loopback as the tests start it: ``tests/redis_servers.py``,
persistence off) serves the whole run. Bench model of ``bench_engines.py``: 8 layers, 8 KV heads of
64, bf16, block 32, chunk 256 tokens: 16 KiB of KV per token, 4 MiB per chunk.

1. Throughput: chunks of 4 MiB in the chunk-buffer shape (8 regions x 8 blocks x 64 KiB rows,
   random bytes, each chunk its own buffer) are stored by ``RemoteStore`` (``submit_write`` of
   every chunk, then ``flush``; header, xxh3 checksum, ``EXISTS`` before ``SET``, block entries)
   and loaded by ``read_into`` (one ``GET``, header check, checksum, copy into a preallocated
   buffer per chunk), one chunk at a time as the executor's one fill thread does. Against plain
   redis-py on the same server in the same run, moving the same bytes: ``SET`` of each chunk's
   buffer (a ``memoryview``, no copy) in pipelines of 8 chunks (the store's batch), and ``GET`` in
   pipelines of 8 and one ``GET`` per chunk; the faster raw figure is the ceiling. A peer: ``SET``
   of the same chunk as ``bytes``, which redis-py packs with hiredis (a copy). Every measurement
   writes fresh keys (new fingerprints, the database emptied first), so the store's ``EXISTS``
   never skips a write; each chunk's write result is checked to have sent 4 MiB. Medians of
   ``--repeats``.
2. Warm TTFT from Redis (4,000-token prompts): engine A (lmcache_connector with
   ``LMCACHE_REMOTE_URL``) serves ``--repeats`` distinct prompts cold, and its writes are flushed;
   A exits. Engine B, a new process on the same Redis (its memory tier empty), serves each prompt
   once: every request misses memory and loads from Redis (B's ``num_cached_tokens`` and its
   remote-tier hit tokens are printed). Against vLLM's own prefix cache (``vllm-prefix-cache``:
   the same prompt again in the same engine) and a cold prefill, in the same run.
3. Scale-out, in the spirit of LMCache's ``multi-round-qa``: two engines side by side, one core
   each; ``--users`` users share one ~1,000-token system prompt, each with a growing history: every
   turn adds a ~100-token question, the engine answers with 32 greedy tokens, and both are
   appended. A user's next turn goes to the other engine (round robin per user; in each round
   both engines serve their users at the same time). Between rounds both engines finish their
   background writes (the users' think time). Mean TTFT per turn with the shared Redis tier
   against the same two engines with their own memory tier only; the Redis run also shows that
   each turn finds the history the other engine computed (``num_cached_tokens``).

TTFT = wall time of ``generate`` with ``max_tokens=1`` inside the engine process (what the engine's
``ttft`` call times), taken from ``generate`` so that ``num_cached_tokens`` comes with it. Results
are printed beside their baselines and written to benchmarks/results/remote_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import redis_servers  # noqa: E402
from bench_engines import bench_engine  # noqa: E402
from remote_store_timing import Timings, time_loads, time_stores  # noqa: E402

from lmcache_connector.testing.tiny_model import BENCH, random_prompt  # noqa: E402
from lmcache_connector.testing.vllm_process import EngineProcess  # noqa: E402
from lmcache_connector.tiers.remote.redis_client import RedisOptions, connect_redis  # noqa: E402
from lmcache_connector.tiers.remote.store import WRITE_BATCH, RemoteStore  # noqa: E402
from lmcache_connector.urls import parse_remote_url  # noqa: E402

VOCAB = BENCH.vocab_size
BLOCK = 32
NS = "cd" * 16
RANK = "tp0pp0"  # the rank that also writes the block entries: the full cost of a store
REGIONS, BLOCKS, ROW = 8, 8, 64 * 1024  # one 256-token chunk of the bench model: 4 MiB
CHUNK_BYTES = REGIONS * BLOCKS * ROW


def remote_env(url: str) -> dict[str, str]:
    return {"LMCACHE_REMOTE_URL": url}


# ---------------------------------------------------------------- 1. throughput


def throughput(url: str, admin: redis.Redis, chunks: int, repeats: int) -> dict:
    data = [torch.randint(0, 256, (REGIONS, BLOCKS, ROW), dtype=torch.uint8) for _ in range(chunks)]
    into = [torch.empty_like(d) for d in data]
    regions = [[memoryview(r.numpy()).cast("B") for r in d] for d in data]
    into_regions = [[memoryview(r.numpy()).cast("B") for r in d] for d in into]
    flat = [memoryview(d.numpy()).cast("B") for d in data]
    # The engine's queue holds 32 chunks and drops what does not fit (never blocking the forward
    # pass); here every chunk is submitted at once, so the queue is sized to hold them all.
    store = RemoteStore(
        connect_redis(parse_remote_url(url), RedisOptions()),
        NS,
        RANK,
        lambda blocks: (REGIONS, blocks, ROW),
        queue_chunks=max(chunks, 32),
    )
    raw = redis.Redis.from_url(url)
    timed = Timings()
    seconds = timed.seconds

    def pipelined(command: Callable[..., object], keys: list[str], values: list | None = None) -> None:
        for start in range(0, len(keys), WRITE_BATCH):
            pipe = raw.pipeline(transaction=False)
            for i in range(start, min(len(keys), start + WRITE_BATCH)):
                command(pipe, keys[i], *([values[i]] if values is not None else []))
            pipe.execute()

    for rep in range(repeats):
        fps = [[bytes.fromhex(f"{rep:08x}{c:08x}{b:016x}") for b in range(BLOCKS)] for c in range(chunks)]

        admin.flushall()
        time_stores(store, timed, fps, regions, CHUNK_BYTES)
        assert admin.dbsize() == chunks * (1 + BLOCKS), "not every value and block entry reached Redis"
        time_loads(store, timed, fps, into_regions, data, into)

        keys = [f"raw:{rep}:{c}" for c in range(chunks)]
        admin.flushall()
        timed("raw_set", lambda keys=keys: pipelined(lambda p, k, v: p.set(k, v), keys, flat))
        timed("raw_get_pipelined", lambda keys=keys: pipelined(lambda p, k: p.get(k), keys))
        timed("raw_get_single", lambda keys=keys: [raw.get(k) for k in keys])
        admin.flushall()
        copies = [bytes(f) for f in flat]  # made outside the timing
        timed("raw_set_bytes", lambda keys=keys, copies=copies: pipelined(lambda p, k, v: p.set(k, v), keys, copies))
        del copies
        admin.flushall()
    dropped = store.take_counts()
    store.close(10)
    raw.close()
    assert not dropped, f"the store counted {dropped}"

    total = chunks * CHUNK_BYTES
    gbps = {name: total / statistics.median(s) / 1e9 for name, s in seconds.items()}
    store_ceiling = gbps["raw_set"]
    load_ceiling = max(gbps["raw_get_pipelined"], gbps["raw_get_single"])
    results = {
        "chunks": chunks,
        "chunk_bytes": CHUNK_BYTES,
        "repeats": repeats,
        "GBps": gbps,
        "store_ratio": gbps["store"] / store_ceiling,
        "load_ratio": gbps["load"] / load_ceiling,
        "load_ratio_to_pipelined_get": gbps["load"] / gbps["raw_get_pipelined"],
        "seconds": seconds,
    }
    print(
        f"  store: RemoteStore {gbps['store']:5.2f} GB/s  raw SET pipelined (memoryview) {store_ceiling:5.2f} GB/s  "
        f"ratio {results['store_ratio']:.2f} (target >= 0.7); peer: raw SET of bytes {gbps['raw_set_bytes']:5.2f} GB/s",
        flush=True,
    )
    print(
        f"  load:  RemoteStore {gbps['load']:5.2f} GB/s  raw GET pipelined {gbps['raw_get_pipelined']:5.2f} GB/s, "
        f"one GET per chunk {gbps['raw_get_single']:5.2f} GB/s  ratio to the faster {results['load_ratio']:.2f} "
        "(target >= 0.7)",
        flush=True,
    )
    return results


# ---------------------------------------------------------------- engines


def ttft(engine: EngineProcess, prompt: list[int]) -> tuple[float, int]:
    """TTFT (``generate`` with ``max_tokens=1``, timed inside the engine) and ``num_cached_tokens``."""
    out = engine.generate([prompt], max_tokens=1)[0]
    return out["seconds"], out["num_cached_tokens"]


def remote_hit_tokens(engine: EngineProcess) -> int:
    return engine.call("connector_state", settle=False)["totals"]["hit_tokens_by_tier"].get("remote", 0)


def warm_up(engine: EngineProcess) -> None:
    engine.generate([random_prompt(64, seed=99, vocab_size=VOCAB)], max_tokens=2)


def vllm_baseline(tmp: str, prompts: list[list[int]], hits: int, cpus: set[int] | None = None) -> dict:
    """The baselines of a warm-TTFT figure, in the same run: a cold prefill (median of the first
    prompts, up to 3) and vLLM's own prefix-cache hit (``prompts[0]`` again, median of ``hits``)."""
    with bench_engine("vllm-prefix-cache", tmp, cpus=cpus) as e:
        warm_up(e)
        colds = [ttft(e, p)[0] for p in prompts[: min(3, len(prompts))]]
        samples = [ttft(e, prompts[0]) for _ in range(hits)]
    results = {
        "cold_s": statistics.median(colds),
        "vllm_prefix_hit_s": statistics.median(s for s, _ in samples),
        "vllm_prefix_hit_cached_tokens": samples[-1][1],
    }
    print(
        f"  cold prefill {results['cold_s']:.3f}s; vLLM prefix-cache hit {results['vllm_prefix_hit_s']:.3f}s "
        f"({samples[-1][1]} tokens cached)",
        flush=True,
    )
    return results


# ---------------------------------------------------------------- 2. warm TTFT from Redis


def warm_ttft(tmp: str, url: str, repeats: int, tokens: int) -> dict:
    prompts = [random_prompt(tokens, seed=1 + i, vocab_size=VOCAB) for i in range(repeats)]
    results: dict = {"prompt_tokens": tokens, "repeats": repeats}
    results.update(vllm_baseline(tmp, prompts, hits=repeats))
    with bench_engine("lmcache_connector", tmp, env=remote_env(url)) as a:
        warm_up(a)
        stores = [ttft(a, p)[0] for p in prompts]
        a.call("connector_state")  # every background write reaches Redis
    results["ours_cold_storing_s"] = statistics.median(stores)
    with bench_engine("lmcache_connector", tmp, env=remote_env(url)) as b:
        warm_up(b)
        samples = []
        for p in prompts:
            before = remote_hit_tokens(b)
            seconds, cached = ttft(b, p)
            samples.append(
                {"ttft_s": seconds, "cached_tokens": cached, "remote_hit_tokens": remote_hit_tokens(b) - before}
            )
    results["from_remote"] = samples
    results["from_remote_s"] = statistics.median(s["ttft_s"] for s in samples)
    results["ratio_to_prefix_hit"] = results["from_remote_s"] / results["vllm_prefix_hit_s"]
    results["ratio_to_cold"] = results["from_remote_s"] / results["cold_s"]
    print(
        f"  engine A cold, storing to {url} {results['ours_cold_storing_s']:.3f}s; engine B (new process) from it "
        f"{results['from_remote_s']:.3f}s ({results['ratio_to_prefix_hit']:.2f}x vLLM's hit, "
        f"{results['ratio_to_cold']:.3f}x cold)  cached tokens {[s['cached_tokens'] for s in samples]}  "
        f"from the remote tier {[s['remote_hit_tokens'] for s in samples]}",
        flush=True,
    )
    return results


# ---------------------------------------------------------------- 3. multi-round chat on two engines


class Chat:
    """The users' conversations: the shared system prompt, then each user's questions and answers."""

    def __init__(self, users: int, system_tokens: int, question_tokens: int):
        self.system = random_prompt(system_tokens, seed=7000, vocab_size=VOCAB)
        self.question_tokens = question_tokens
        self.history = [list(self.system) for _ in range(users)]
        self.last_prompt = [0] * users  # tokens of each user's last prompt (its answer's KV is not stored)

    def question(self, user: int, turn: int) -> list[int]:
        return random_prompt(self.question_tokens + 7 * user, seed=8000 + 100 * user + turn, vocab_size=VOCAB)


def chat_run(
    tmp: str, env: dict[str, str] | None, users: int, turns: int, system_tokens: int, answer_tokens: int
) -> dict:
    started: dict[int, EngineProcess] = {}

    def start(cpu: int) -> None:
        started[cpu] = bench_engine("lmcache_connector", tmp, env=env, cpus={cpu})

    starters = [threading.Thread(target=start, args=(cpu,)) for cpu in (0, 1)]
    for t in starters:
        t.start()
    for t in starters:
        t.join()
    if len(started) != 2:
        for e in started.values():
            e.close()
        raise RuntimeError("an engine failed to start")
    engines = [started[0], started[1]]
    chat = Chat(users, system_tokens, question_tokens=100)
    turns_log: list[list[dict]] = []
    try:
        for e in engines:
            warm_up(e)
        for turn in range(turns):
            log: list[dict] = [{} for _ in range(users)]

            def serve(e: int, turn: int = turn, log: list[dict] = log) -> None:
                engine = engines[e]
                for user in range(users):
                    if (user + turn) % 2 != e:
                        continue
                    previous = chat.last_prompt[user]  # served by the other engine (none on the first turn)
                    prompt = chat.history[user] + chat.question(user, turn)
                    before = remote_hit_tokens(engine)
                    seconds, cached = ttft(engine, prompt)
                    remote = remote_hit_tokens(engine) - before
                    answer = engine.generate([prompt], max_tokens=answer_tokens)[0]["token_ids"]
                    chat.history[user] = prompt + answer
                    chat.last_prompt[user] = len(prompt)
                    log[user] = {
                        "engine": e,
                        "prompt_tokens": len(prompt),
                        "previous_prompt_tokens": previous,
                        "ttft_s": seconds,
                        "cached_tokens": cached,
                        "remote_hit_tokens": remote,
                    }

            workers = [threading.Thread(target=serve, args=(e,)) for e in (0, 1)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            if any(not entry for entry in log):
                raise RuntimeError(f"turn {turn}: a request failed (see the engine's output)")
            for e in engines:  # the users think: background writes finish
                e.call("connector_state")
            turns_log.append(log)
    finally:
        for e in engines:
            e.close()
    per_turn = [statistics.mean(entry["ttft_s"] for entry in log) for log in turns_log]
    later = [entry for log in turns_log[1:] for entry in log]
    return {
        "turns": turns_log,
        "mean_ttft_per_turn_s": per_turn,
        "mean_ttft_s": statistics.mean(per_turn),
        "mean_ttft_after_first_turn_s": statistics.mean(entry["ttft_s"] for entry in later),
        "mean_cached_tokens_after_first_turn": statistics.mean(entry["cached_tokens"] for entry in later),
        "mean_prompt_tokens_after_first_turn": statistics.mean(entry["prompt_tokens"] for entry in later),
        # A turn found every full block of the user's last prompt, which the other engine computed:
        # the history computed there is a hit here. (An answer's KV is computed during decode and
        # not stored, by either engine: the answer and the new question are prefilled every turn.)
        "turns_hitting_the_other_engines_history": sum(
            entry["cached_tokens"] >= entry["previous_prompt_tokens"] // BLOCK * BLOCK for entry in later
        ),
        "turns_after_first": len(later),
    }


def scale_out(
    tmp: str, url: str, admin: redis.Redis, users: int, turns: int, system_tokens: int, answer_tokens: int
) -> dict:
    results = {"users": users, "turns": turns, "system_tokens": system_tokens, "answer_tokens": answer_tokens}
    for name, env in (("memory_only", None), ("shared_redis", remote_env(url))):
        admin.flushall()
        run = chat_run(tmp, env, users, turns, system_tokens, answer_tokens)
        results[name] = run
        per_turn = " ".join(f"{s:.3f}" for s in run["mean_ttft_per_turn_s"])
        print(
            f"  {name:12} mean TTFT {run['mean_ttft_s']:.3f}s "
            f"(turns after the first {run['mean_ttft_after_first_turn_s']:.3f}s); per turn {per_turn}; "
            "cached tokens after the first turn "
            f"{run['mean_cached_tokens_after_first_turn']:.0f} of {run['mean_prompt_tokens_after_first_turn']:.0f}; "
            f"the other engine's history found in {run['turns_hitting_the_other_engines_history']}/"
            f"{run['turns_after_first']} turns",
            flush=True,
        )
    ours, alone = results["shared_redis"], results["memory_only"]
    results["ratio"] = ours["mean_ttft_s"] / alone["mean_ttft_s"]
    results["ratio_after_first_turn"] = ours["mean_ttft_after_first_turn_s"] / alone["mean_ttft_after_first_turn_s"]
    example = next(
        (entry for log in ours["turns"][1:] for entry in log if entry["remote_hit_tokens"]), ours["turns"][-1][0]
    )
    results["example_turn"] = example
    print(
        f"  e.g. a turn on engine {example['engine']}: prompt {example['prompt_tokens']} tokens, the user's last "
        f"prompt (on the other engine) {example['previous_prompt_tokens']}, cached {example['cached_tokens']} "
        f"({example['remote_hit_tokens']} from Redis)",
        flush=True,
    )
    return results


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run (fewer chunks, repeats and turns)")
    parser.add_argument("--chunks", type=int, help="4 MiB chunks per throughput measurement (default 64; quick 16)")
    parser.add_argument("--repeats", type=int, help="throughput repeats and warm-TTFT prompts (default 5; quick 3)")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--turns", type=int, help="chat turns per user (default 6; quick 3)")
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "remote_cpu.json"))
    args = parser.parse_args()
    chunks = args.chunks or (16 if args.quick else 64)
    repeats = args.repeats or (3 if args.quick else 5)
    turns = args.turns or (3 if args.quick else 6)

    started = time.monotonic()
    (REPO / ".cache").mkdir(exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=str(REPO / ".cache")) as tmp,
        redis_servers.redis_server(Path(tmp) / "redis") as server,
    ):
        url = f"redis://127.0.0.1:{server.port}"
        admin = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=60)
        print(f"Redis {admin.info('server')['redis_version']} on {url}", flush=True)
        print(f"1. store and load throughput ({chunks} chunks of 4 MiB, median of {repeats})", flush=True)
        tput = throughput(url, admin, chunks, repeats)
        admin.flushall()
        print(f"2. warm TTFT from Redis (bench model, 4,000-token prompts, {repeats} of them)", flush=True)
        ttfts = warm_ttft(tmp, url, repeats, 4000)
        print(
            f"3. scale-out chat: 2 engines (one core each), {args.users} users, {turns} turns, "
            f"{args.system_tokens}-token system prompt, {args.answer_tokens}-token answers",
            flush=True,
        )
        chat = scale_out(tmp, url, admin, args.users, turns, args.system_tokens, args.answer_tokens)
        admin.close()

    g = tput["GBps"]
    hit = ttfts["vllm_prefix_hit_s"]
    print()
    print(f"Summary (ratios against baselines measured in this run; {time.monotonic() - started:.0f} s)")
    rows = [
        (
            "store throughput",
            f"{g['store']:.2f} GB/s",
            f"raw SET pipelined {g['raw_set']:.2f} GB/s",
            f"{tput['store_ratio']:.2f}x",
            ">= 0.7x",
        ),
        (
            "load throughput",
            f"{g['load']:.2f} GB/s",
            f"raw GET {max(g['raw_get_pipelined'], g['raw_get_single']):.2f} GB/s",
            f"{tput['load_ratio']:.2f}x",
            ">= 0.7x",
        ),
        (
            "warm TTFT from Redis",
            f"{ttfts['from_remote_s']:.3f} s",
            f"vLLM prefix hit {hit:.3f} s",
            f"{ttfts['ratio_to_prefix_hit']:.2f}x",
            "<= 2x",
        ),
        (
            "  (same, against cold)",
            f"{ttfts['from_remote_s']:.3f} s",
            f"cold prefill {ttfts['cold_s']:.3f} s",
            f"{ttfts['from_remote_s'] / ttfts['cold_s']:.3f}x",
            "",
        ),
        (
            "chat mean TTFT",
            f"{chat['shared_redis']['mean_ttft_s']:.3f} s",
            f"memory tier only {chat['memory_only']['mean_ttft_s']:.3f} s",
            f"{chat['ratio']:.2f}x",
            "lower is better",
        ),
        (
            "  (turns after the first)",
            f"{chat['shared_redis']['mean_ttft_after_first_turn_s']:.3f} s",
            f"memory tier only {chat['memory_only']['mean_ttft_after_first_turn_s']:.3f} s",
            f"{chat['ratio_after_first_turn']:.2f}x",
            "",
        ),
    ]
    table = [("measure", "remote tier", "baseline", "ratio", "target"), *rows]
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    for row in table:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"throughput": tput, "warm_ttft": ttfts, "scale_out_chat": chat, "args": vars(args)}, indent=2)
    )
    print(f"Written to {args.out}")


if __name__ == "__main__":
    main()
