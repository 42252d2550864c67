"""Decode latency of running requests while a late request loads a long prefix from the disk tier.

Workload, on the bench model (Llama, hidden 1024, 8 layers, 8 KV heads of 64, bf16, block 32,
chunk 256: 16 KiB of KV per token, 4 MiB per chunk file): ``--running`` requests with distinct
``--running-tokens``-token prompts decode ``--decode-tokens`` tokens each (greedy, ``ignore_eos``).
After ``--late-after`` engine steps a late request arrives for one token: a ``--prefix-tokens``-token
prefix that is in the disk tier only, plus ``--suffix-tokens`` new tokens. Three variants, one run:

* ``no-load``: no late request; the running requests decode alone (the baseline);
* ``sync`` (``LMCACHE_DISK_ASYNC_FILLS=False``): the prefix's chunk files are read on the
  model-runner thread, before the forward of the step that schedules the late request;
* ``async`` (``LMCACHE_DISK_ASYNC_FILLS=True``): vLLM parks the late request in
  ``WAITING_FOR_REMOTE_KVS`` while a background thread reads the files; it is scheduled once they are
  in. The default, ``auto``, takes this path for files not in the page cache, as here.

A reference beside them, ``memory``: right after each ``async`` timeline, on the same engine, the same
prefix (which the async fill left in the memory tier) with other new tokens, loaded from memory in
the step that admits it. Its stall is the floor for any hit on this prefix (a 64 MiB copy and the
late request's first forward over its 4,000-token context), which no way of reading the disk can beat.

Method. A first engine process computes ``--repeats`` distinct prefixes, stores them to a disk folder
and exits (writes flushed). Two engines then start on that folder (memory tier empty, vLLM's prefix
cache off, ``LMCACHE_MAX_LOCAL_CPU_SIZE=1``): one sync, one async; ``no-load`` runs on the async one.
Both stay up for the whole run and serve the same workload: repeat ``r`` loads stored prefix ``r``
(so every late request reads its whole prefix from disk, never from memory) with fresh running
prompts, and the three variants of a repeat run back to back in an order rotated per repeat (a slow
drift of the machine falls on all of them alike; a burst of other work does not, hence the load
average printed at the end). Before each timeline the disk writers are
flushed and the page cache of every file in the folder is evicted (``posix_fadvise(DONTNEED)``;
the resident bytes are checked with ``mincore``). Token times come from
``EngineProcess.call("decode_timeline")``, which steps the engine by hand: a token's time is when
its step returned. ITL = the gap between consecutive tokens of one running request, pooled over
the running requests and the repeats (every running request gets one token per step, so the pool is
each step's gap once per request): over the whole decode, and over the window of ``--window`` steps
starting with the step that admits the late request (the same steps in ``no-load``). Late TTFT =
``add_request`` to the step that returns the late token. Evidence that the late request was served
from disk: the connector's totals (``connector_state()["totals"]``: hit tokens, and those the disk
tier supplied) before and after each timeline, the engine steps between its arrival and its token
(1: loaded in the admitting step, as sync does; more: parked while a background read ran), and the
bytes of the files stored before the timeline that were back in the page cache after it
(``mincore``; 0 right before it).

Prints the figures beside the no-load baseline of the same run and the issue's targets (async max
ITL <= 0.5x sync max ITL, for the whole decode, the window, and the median over the repeats of each
repeat's window maximum, which one burst of other work cannot decide; async p50 ITL <= 1.2x no-load
p50) and writes benchmarks/results/async_fills_cpu.json.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_engines import bench_engine  # noqa: E402

from lmcache_connector.testing.tiny_model import BENCH, random_prompt  # noqa: E402
from lmcache_connector.testing.vllm_process import EngineProcess  # noqa: E402

VOCAB = BENCH.vocab_size
VARIANTS = ("no-load", "sync", "async")
REFERENCE = "memory"  # the same late request with its prefix in the memory tier: the floor of its stall
ALL = (*VARIANTS, REFERENCE)
MIB = 2**20
BLOCK = 32  # bench_engine's vLLM block size


def engine(tmp: str, folder: str, async_fills: bool) -> EngineProcess:
    env = {"LMCACHE_DISK_ASYNC_FILLS": str(async_fills), "LMCACHE_MAX_LOCAL_CPU_SIZE": "1"}
    return bench_engine("lmcache_connector", tmp, disk_folder=folder, env=env)


# ---------------------------------------------------------------- the page cache


def evict_page_cache_tree(folder: str) -> None:
    """As ``bench_disk.py``: write back, then drop every file's pages (``posix_fadvise(DONTNEED)``)."""
    os.sync()
    for path in _files(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(folder: str, only: set[str] | None = None) -> tuple[int, int]:
    """(bytes of the folder's files (those in ``only``, if given) in the page cache, their total size),
    by ``mincore``."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page = mmap.PAGESIZE
    resident = total = 0
    for path in _files(folder):
        if only is not None and path not in only:
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                continue
            total += size
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                continue
            try:
                pages = -(-size // page)
                vec = ctypes.create_string_buffer(pages)
                if libc.mincore(addr, size, vec) == 0:
                    resident += sum(b & 1 for b in vec.raw) * page
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    return min(resident, total), total


def _files(folder: str) -> list[str]:
    return [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]


# ---------------------------------------------------------------- one timeline


def run_timeline(e: EngineProcess, folder: str, running: list[list[int]], late: list[int] | None, args) -> dict:
    before = e.call("connector_state")["totals"]  # settles: queued disk writes are done
    evict_page_cache_tree(folder)
    stored = set(_files(folder))  # files this timeline can read (it writes new ones for the running prompts)
    cached_before, _ = resident_bytes(folder, stored)
    out = e.call(
        "decode_timeline",
        prompts=running,
        max_tokens=args.decode_tokens,
        late_prompt=late,
        late_after_steps=args.late_after,
    )
    cached_after, _ = resident_bytes(folder, stored)
    after = e.call("connector_state")["totals"]
    steps = out["tokens"][0]  # every running request gets its token in the same steps
    if any(len(t) != args.decode_tokens or t != steps for t in out["tokens"]):
        raise RuntimeError("running requests did not decode in lockstep, one token per step")
    gaps = [b - a for a, b in zip(steps[:-1], steps[1:], strict=True)]  # gaps[i - 1]: the step of token i
    added, first = out["late_added"], out["late_first_token"]
    admit = args.late_after if added is None else next(i for i, t in enumerate(steps) if t > added)
    result = {
        "step_gaps_s": gaps,
        "admit_token": admit,
        "window_gaps_s": gaps[max(0, admit - 1) : admit - 1 + args.window],
        "late_ttft_s": None if added is None else first - added,
        # engine steps from the late request's arrival to its token (1: served in the admitting step)
        "late_steps": None if added is None else sum(added < t <= first for t in steps) or None,
        "hit_tokens": after["hit_tokens"] - before["hit_tokens"],
        "disk_hit_tokens": after["hit_tokens_by_tier"].get("disk", 0) - before["hit_tokens_by_tier"].get("disk", 0),
        "page_cache_before_bytes": cached_before,
        "page_cache_after_bytes": cached_after,
    }
    if added is not None and first is None:
        raise RuntimeError("the late request returned no token")
    return result


# ---------------------------------------------------------------- statistics


def percentiles(values: list[float]) -> dict:
    arr = np.asarray(values) * 1000
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p99_ms": float(np.percentile(arr, 99)),
        "max_ms": float(arr.max()),
    }


def summarize(runs: list[dict], running: int) -> dict:
    whole = [g for r in runs for g in r["step_gaps_s"] for _ in range(running)]
    window = [g for r in runs for g in r["window_gaps_s"] for _ in range(running)]
    ttfts = [r["late_ttft_s"] for r in runs if r["late_ttft_s"] is not None]
    return {
        "itl_whole": percentiles(whole),
        "itl_window": percentiles(window),
        "max_itl_per_repeat_ms": [max(r["step_gaps_s"]) * 1000 for r in runs],
        "window_max_itl_per_repeat_ms": [max(r["window_gaps_s"]) * 1000 for r in runs],
        "late_ttft_median_s": statistics.median(ttfts) if ttfts else None,
        "late_ttft_s": ttfts,
        "late_steps": [r["late_steps"] for r in runs],
        "hit_tokens": [r["hit_tokens"] for r in runs],
        "disk_hit_tokens": [r["disk_hit_tokens"] for r in runs],
        "samples": len(whole),
    }


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix-tokens", type=int, default=4000, help="the late request's prefix, stored on disk")
    parser.add_argument("--suffix-tokens", type=int, default=16, help="new tokens after the prefix")
    parser.add_argument("--running", type=int, default=4, help="requests decoding while the late one loads")
    parser.add_argument("--running-tokens", type=int, default=128, help="prompt length of each running request")
    parser.add_argument("--decode-tokens", type=int, default=128, help="tokens each running request decodes")
    parser.add_argument("--late-after", type=int, default=32, help="engine steps before the late request arrives")
    parser.add_argument("--window", type=int, default=16, help="steps of the ITL window from the admitting step")
    parser.add_argument("--repeats", type=int, default=8, help="timelines per variant (one stored prefix each)")
    parser.add_argument("--quick", action="store_true", help="2 repeats of 64 tokens: a check that it runs")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "async_fills_cpu.json"))
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.decode_tokens, args.late_after = 2, 64, 16
    if args.late_after + args.window > args.decode_tokens:
        parser.error("--late-after + --window must not exceed --decode-tokens")

    started, load_before = time.monotonic(), os.getloadavg()
    prefixes = [random_prompt(args.prefix_tokens, seed=7000 + r, vocab_size=VOCAB) for r in range(args.repeats)]
    print(
        f"Workload: {args.running} running requests ({args.running_tokens}-token prompts, {args.decode_tokens} "
        f"tokens each); after {args.late_after} steps a late request: a {args.prefix_tokens:,}-token prefix "
        f"on disk + {args.suffix_tokens} new tokens, for 1 token; {args.repeats} repeats; page cache evicted "
        f"before each timeline; {os.cpu_count()} CPUs",
        flush=True,
    )
    with tempfile.TemporaryDirectory(dir=str(REPO / ".cache")) as tmp:
        folder = f"{tmp}/disk"
        os.makedirs(folder)
        print("1. storing the prefixes to disk (engine 1, then it exits)", flush=True)
        with engine(tmp, folder, async_fills=True) as e:
            for prefix in prefixes:
                e.generate([prefix], max_tokens=1)
            stored = e.call("connector_state")
        _, folder_bytes = resident_bytes(folder)
        store = {"disk_chunks": stored["disk_chunks"], "files": len(_files(folder)), "bytes": folder_bytes}
        print(
            f"  {store['disk_chunks']} chunks on disk ({store['files']} files, {folder_bytes / MIB:.0f} MiB)",
            flush=True,
        )

        print("2. timelines (two fresh engines on the folder: sync and async; no-load runs on the async one)")
        engines: dict[str, EngineProcess] = {}
        try:
            for name, flag in (("sync", False), ("async", True)):
                engines[name] = engine(tmp, folder, async_fills=flag)
                warm = [random_prompt(args.running_tokens, seed=90 + i, vocab_size=VOCAB) for i in range(args.running)]
                engines[name].call(  # warm-up: the same shape, the late request a cold 256-token prompt
                    "decode_timeline",
                    prompts=warm,
                    max_tokens=args.decode_tokens,
                    late_prompt=random_prompt(256, seed=95, vocab_size=VOCAB),
                    late_after_steps=args.late_after,
                )
            runs: dict[str, list[dict]] = {v: [] for v in ALL}
            for r in range(args.repeats):
                order = [*VARIANTS[r % 3 :], *VARIANTS[: r % 3]]
                order.insert(order.index("async") + 1, REFERENCE)  # async just filled prefix r into memory
                for variant in order:
                    seed = 10_000 * (r + 1)  # sync and async get the same late prompt; every timeline new running ones
                    running = [
                        random_prompt(args.running_tokens, seed=seed + 100 * ALL.index(variant) + i, vocab_size=VOCAB)
                        for i in range(args.running)
                    ]
                    late = None
                    if variant != "no-load":  # the same new tokens in sync and async; others in the reference
                        suffix = random_prompt(
                            args.suffix_tokens, seed=seed + 99 - (variant == REFERENCE), vocab_size=VOCAB
                        )
                        late = prefixes[r] + suffix
                    e = engines["sync" if variant == "sync" else "async"]
                    res = run_timeline(e, folder, running, late, args)
                    runs[variant].append(res)
                    line = (
                        f"  repeat {r + 1} {variant:7}: max ITL {max(res['step_gaps_s']) * 1000:6.1f} ms, "
                        f"median {statistics.median(res['step_gaps_s']) * 1000:5.1f} ms"
                    )
                    if late is not None:
                        line += (
                            f"; late TTFT {res['late_ttft_s'] * 1000:6.1f} ms in {res['late_steps']} step(s), "
                            f"{res['hit_tokens']} tokens hit ({res['disk_hit_tokens']} from disk); stored files "
                            f"in the page cache {res['page_cache_before_bytes'] / MIB:.1f} -> "
                            f"{res['page_cache_after_bytes'] / MIB:.1f} MiB"
                        )
                    print(line, flush=True)
        finally:
            for e in engines.values():
                e.close()

    summary = {v: summarize(runs[v], args.running) for v in ALL}
    print()
    print(
        f"Summary: ITL of the running requests, ms: whole decode ({summary['no-load']['samples']} gaps per variant: "
        f"{args.running} requests x {args.decode_tokens - 1} x {args.repeats} repeats) and window ({args.window} "
        "steps from the one that admits the late request; in no-load the same steps); "
        "'med rep max': median over the repeats of each repeat's window max"
    )
    print(
        f"  {'variant':8} {'p50':>6} {'p99':>6} {'max':>6} | {'win p50':>7} {'win p99':>7} {'win max':>7} "
        f"{'med rep max':>11} | {'late TTFT':>9}  {'late steps':<16} {'hit tokens (disk)':>17}"
    )
    for v in ALL:
        s, late = summary[v], v != "no-load"
        w, win = s["itl_whole"], s["itl_window"]
        ttft = f"{s['late_ttft_median_s'] * 1000:.1f} ms" if late else "-"
        steps = "/".join(str(n) for n in s["late_steps"]) if late else "-"
        hits = f"{min(s['hit_tokens'])} ({min(s['disk_hit_tokens'])})" if late else "-"
        print(
            f"  {v:8} {w['p50_ms']:6.1f} {w['p99_ms']:6.1f} {w['max_ms']:6.1f} | {win['p50_ms']:7.1f} "
            f"{win['p99_ms']:7.1f} {win['max_ms']:7.1f} {statistics.median(s['window_max_itl_per_repeat_ms']):11.1f} "
            f"| {ttft:>9}  {steps:<16} {hits:>17}"
        )
    print("  (late TTFT: median; late steps: per repeat, engine steps from its arrival to its token; hit tokens:")
    print("   the fewest over the repeats, from the connector's totals; ITL 'max' per repeat, whole decode:)")
    for v in ALL:
        print(f"   {v:8} " + " ".join(f"{m:.0f}" for m in summary[v]["max_itl_per_repeat_ms"]))

    def ratio(variant: str, base: str, key: str, stat: str) -> float:
        return summary[variant][key][stat] / summary[base][key][stat]

    def median_window_max(variant: str) -> float:
        return statistics.median(summary[variant]["window_max_itl_per_repeat_ms"])

    ratios = {
        "async_max_over_sync_max": ratio("async", "sync", "itl_whole", "max_ms"),
        "async_window_max_over_sync_window_max": ratio("async", "sync", "itl_window", "max_ms"),
        "async_over_sync_median_repeat_window_max": median_window_max("async") / median_window_max("sync"),
        "async_p50_over_no_load_p50": ratio("async", "no-load", "itl_whole", "p50_ms"),
        "async_window_p50_over_no_load_window_p50": ratio("async", "no-load", "itl_window", "p50_ms"),
        "sync_p50_over_no_load_p50": ratio("sync", "no-load", "itl_whole", "p50_ms"),
        "async_window_max_over_memory_window_max": ratio("async", REFERENCE, "itl_window", "max_ms"),
        "async_over_memory_median_repeat_window_max": median_window_max("async") / median_window_max(REFERENCE),
    }

    def verdict(value: float, target: float) -> str:
        return f"{value:.2f} ({'met' if value <= target else 'NOT met'})"

    print(
        "  target async max ITL <= 0.5x sync max ITL: whole decode "
        f"{verdict(ratios['async_max_over_sync_max'], 0.5)}, window "
        f"{verdict(ratios['async_window_max_over_sync_window_max'], 0.5)}, median of per-repeat window maxima "
        f"{verdict(ratios['async_over_sync_median_repeat_window_max'], 0.5)}"
    )
    print(
        "  target async p50 ITL <= 1.2x no-load p50: whole decode "
        f"{verdict(ratios['async_p50_over_no_load_p50'], 1.2)}, window "
        f"{verdict(ratios['async_window_p50_over_no_load_window_p50'], 1.2)} (sync, whole decode: "
        f"{ratios['sync_p50_over_no_load_p50']:.2f})"
    )
    print(
        f"  reference: async window max / {REFERENCE} window max (its prefix already in the memory tier): "
        f"{ratios['async_window_max_over_memory_window_max']:.2f}; median of per-repeat window maxima "
        f"{ratios['async_over_memory_median_repeat_window_max']:.2f}"
    )
    problems = [
        f"{v} repeat {i + 1}: {r['hit_tokens']} tokens hit, {r['disk_hit_tokens']} from disk"
        for v in ("sync", "async", REFERENCE)
        for i, r in enumerate(runs[v])
        if r["hit_tokens"] < args.prefix_tokens - BLOCK
        or (r["disk_hit_tokens"] < args.prefix_tokens - BLOCK) != (v == REFERENCE)
    ]
    if problems:
        print("  WARNING: a late request was not served its prefix from where it should be: " + "; ".join(problems))
    elapsed, load_after = time.monotonic() - started, os.getloadavg()
    print(
        f"  ({elapsed:.0f} s in all; load average {load_before[0]:.2f} before the run, 1/5/15-min "
        f"{load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f} after it, on {os.cpu_count()} CPUs)"
    )
    result = {
        "config": {**vars(args), "cpus": os.cpu_count(), "machine": platform.machine()},
        "load_average": {"before": load_before, "after": load_after},
        "elapsed_s": elapsed,
        "store": store,
        "summary": summary,
        "ratios": ratios,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"Written to {args.out}")


if __name__ == "__main__":
    main()
