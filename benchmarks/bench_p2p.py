"""The peer tier: fetch throughput against a plain loopback transfer, and a new engine's warm TTFT from a peer.

1. Throughput (default). A server process, as a real peer is, holds ``--chunks`` chunks of the bench
   model (``bench_remote.py``: 4 MiB each, 8 regions x 8 blocks x 64 KiB rows, random bytes) in a
   pool of memory slots behind a :class:`~lmcache_connector.tiers.memory.slots.SlotTable`, and
   serves them two ways on loopback:

   * ``peer``: a :class:`~lmcache_connector.tiers.peer.server.PeerServer` on the slot table as the
     worker keeps it: each chunk hashed in its slot and sent from there (SENT), then CONFIRMED
     (the slot's generation unchanged). This process
     fetches every chunk with one :meth:`PeerClient.fetch` (one request; the value's header checked
     before its bytes are read, each chunk received straight into a preallocated buffer, the
     checksum computed as the bytes land), on a connection kept from the previous repeat (the
     client reuses its connections), as the tier does;
   * ``peer_copying``: the same, from a second server whose slot table cannot lend its slots, so
     each chunk is copied out, confirmed, hashed and sent as FOUND (the path of a disk chunk, and
     the only path before SENT / CONFIRMED);
   * ``raw`` (the ceiling): a plain socket in the same server process sends the same chunks
     straight from their slots (no copy, no header, no checksum), and this process receives each
     into the same preallocated buffers with ``recv_into``, no timeouts. One connection, kept.

   Also the CPU time each process spent per chunk (``time.process_time``, the server's asked over
   a pipe before and after each measurement): what serving costs the peer's engine.
   Every chunk is verified after each timing (outside it): every fetch found every chunk, and the
   xxh3 of each buffer equals the one the server computed of its slot. Medians of ``--repeats``;
   the three alternate within each repeat.

2. Warm TTFT from a peer (``--ttft``; minutes). One real ``redis-server`` (``tests/redis_servers.py``)
   is the lookup registry. Engine A (lmcache_connector, P2P on, serving on a free port, one core)
   serves ``--prompts`` distinct 4,000-token prompts cold; once every chunk is published, engine B
   (a new process, P2P on, its memory tier empty, the other core) serves each prompt once: every
   chunk comes from A's memory over the peer protocol (B's ``num_cached_tokens`` and its peer-tier
   hit tokens are printed; a request that found nothing, e.g. after a registry lookup past
   ``--lookup-timeout-ms``, is counted as a miss and stays in the median). Against vLLM's own
   prefix-cache hit (the same prompt again in one engine, on B's core) and a cold prefill on that
   engine, in the same run. TTFT as in ``bench_remote.py``: ``generate`` with ``max_tokens=1``,
   timed inside the engine.

Results are printed beside their baselines and written to benchmarks/results/p2p_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import xxhash  # noqa: E402

from lmcache_connector.tiers.memory.slots import SlotTable  # noqa: E402
from lmcache_connector.tiers.peer.addresses import PeerAddress  # noqa: E402
from lmcache_connector.tiers.peer.client import ChunkWant, PeerClient  # noqa: E402
from lmcache_connector.tiers.peer.server import PeerServer, ServerLimits  # noqa: E402

NS = "cd" * 16
REGIONS, BLOCKS, ROW = 8, 8, 64 * 1024  # one 256-token chunk of the bench model: 4 MiB
CHUNK_BYTES = REGIONS * BLOCKS * ROW
SHAPE = (REGIONS, BLOCKS, ROW)
TARGET_THROUGHPUT = 0.6
TARGET_TTFT = 2.0


# ---------------------------------------------------------------- 1. the server process


def _serve_chunks(conn, chunks: int) -> None:
    """The peer's process: a pool of slots holding random chunks, a PeerServer and a raw sender on it."""
    pool = bytearray(os.urandom(chunks * CHUNK_BYTES))
    view = memoryview(pool)

    def copy_out(slot: int, shape, into: memoryview) -> None:
        regions, blocks, row = shape  # the pool holds whole chunks: a slot's bytes are contiguous
        start = slot * CHUNK_BYTES
        into[: regions * blocks * row] = view[start : start + regions * blocks * row]

    def view_out(slot: int, shape) -> list[memoryview]:
        regions, blocks, row = shape
        start = slot * CHUNK_BYTES
        return [view[start + r * blocks * row : start + (r + 1) * blocks * row] for r in range(regions)]

    lending = SlotTable(chunks, copy_out, view_out)  # what the worker's table does on a host pool
    copying = SlotTable(chunks, copy_out)  # a table that can only copy (the path of disk chunks)
    fps = []
    for slot in range(chunks):
        block_fps = tuple(os.urandom(16) for _ in range(BLOCKS))
        for table in (lending, copying):
            table.overwriting(slot)
            table.holds(slot, block_fps[-1], block_fps, SHAPE)
        fps.append(block_fps)
    digests = [xxhash.xxh3_64_hexdigest(view[s * CHUNK_BYTES : (s + 1) * CHUNK_BYTES]) for s in range(chunks)]
    limits = ServerLimits(io_timeout_s=60)
    servers = [PeerServer(t, NS, 0, 0, PeerAddress("127.0.0.1", 0), limits=limits).start() for t in (lending, copying)]

    listener = socket.create_server(("127.0.0.1", 0))

    def raw_sender() -> None:
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        count = bytearray(4)
        while True:
            got = sock.recv_into(count)
            if got != 4:
                return
            (n,) = struct.unpack("<I", count)
            for slot in range(n):
                sock.sendall(view[slot * CHUNK_BYTES : (slot + 1) * CHUNK_BYTES])

    threading.Thread(target=raw_sender, daemon=True).start()
    ports = [server.address.port for server in servers]
    conn.send({"peer_ports": ports, "raw_port": listener.getsockname()[1], "fps": fps, "digests": digests})
    while conn.recv() == "cpu":  # until the end of the run, this process's CPU time when asked
        conn.send(time.process_time())
    conn.send([server.take_counts() for server in servers])
    for server in servers:
        server.close()


def throughput(chunks: int, repeats: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve_chunks, args=(child, chunks), daemon=True)
    proc.start()
    try:
        info = parent.recv()
        buffers = [bytearray(CHUNK_BYTES) for _ in range(chunks)]
        for buffer in buffers:  # fault the pages in before any timing
            buffer[::4096] = b"\1" * len(buffer[::4096])
        wants = [
            ChunkWant(
                fps, SHAPE, [memoryview(buffer)[r * BLOCKS * ROW : (r + 1) * BLOCKS * ROW] for r in range(REGIONS)]
            )
            for fps, buffer in zip(info["fps"], buffers, strict=True)
        ]
        client = PeerClient(NS, 0)
        lending, copying = (PeerAddress("127.0.0.1", port) for port in info["peer_ports"])
        raw = socket.create_connection(("127.0.0.1", info["raw_port"]))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def verify(name: str) -> None:
            for c, buffer in enumerate(buffers):
                if xxhash.xxh3_64_hexdigest(buffer) != info["digests"][c]:
                    raise AssertionError(f"{name}: chunk {c} arrived with other bytes")
                buffer[:8] = b"\0" * 8  # the next measurement must write it again

        def fetch_peer(address: PeerAddress = lending) -> None:
            result = client.fetch(address, wants, timeout_s=60)
            if result.error is not None or not all(result.found):
                raise AssertionError(f"peer fetch: found {sum(result.found)}/{chunks}: {result.error}")

        def fetch_raw() -> None:
            raw.sendall(struct.pack("<I", chunks))
            for buffer in buffers:
                view, got = memoryview(buffer), 0
                while got < CHUNK_BYTES:
                    n = raw.recv_into(view[got:])
                    if not n:
                        raise ConnectionError("the raw sender closed")
                    got += n

        runs = (("peer", fetch_peer), ("raw", fetch_raw), ("peer_copying", lambda: fetch_peer(copying)))
        seconds: dict[str, list[float]] = {name: [] for name, _ in runs}
        cpu: dict[str, dict[str, list[float]]] = {name: {"server": [], "client": []} for name, _ in runs}
        for name, run in runs:  # warm every connection
            run()
            verify(name)
        for _ in range(repeats):
            for name, run in runs:
                parent.send("cpu")
                server_cpu = parent.recv()
                client_cpu = time.process_time()
                started = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - started)
                cpu[name]["client"].append(time.process_time() - client_cpu)
                parent.send("cpu")
                cpu[name]["server"].append(parent.recv() - server_cpu)
                verify(name)
        client.close()
        raw.close()
        parent.send("done")
        counts = parent.recv()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    total = chunks * CHUNK_BYTES
    gbps = {name: total / statistics.median(s) / 1e9 for name, s in seconds.items()}
    cpu_ms_per_chunk = {
        name: {side: 1000 * statistics.median(values) / chunks for side, values in sides.items()}
        for name, sides in cpu.items()
    }
    results = {
        "chunks": chunks,
        "chunk_bytes": CHUNK_BYTES,
        "repeats": repeats,
        "GBps": gbps,
        "ratio": gbps["peer"] / gbps["raw"],
        "ratio_copying": gbps["peer_copying"] / gbps["raw"],
        "target": TARGET_THROUGHPUT,
        "seconds": seconds,
        "cpu_ms_per_chunk": cpu_ms_per_chunk,  # CPU time of the server / this (client) process
        "server_counts": {"lending": counts[0], "copying": counts[1]},
    }
    print(
        f"  peer fetch {gbps['peer']:5.2f} GB/s  raw loopback {gbps['raw']:5.2f} GB/s  "
        f"ratio {results['ratio']:.2f} (target >= {TARGET_THROUGHPUT}); from a source that copies (a disk "
        f"chunk's path) {gbps['peer_copying']:5.2f} GB/s, {results['ratio_copying']:.2f}",
        flush=True,
    )
    print(
        "  CPU ms per chunk (server process / client process): "
        + ", ".join(f"{name} {c['server']:.2f} / {c['client']:.2f}" for name, c in cpu_ms_per_chunk.items()),
        flush=True,
    )
    return results


# ---------------------------------------------------------------- 2. warm TTFT from a peer


def warm_ttft(prompts_count: int, tokens: int, lookup_timeout_ms: int) -> dict:
    import redis_servers
    from bench_engines import bench_engine
    from bench_remote import VOCAB, ttft, vllm_baseline, warm_up
    from peer_support import free_ports

    from lmcache_connector.testing.tiny_model import random_prompt
    from lmcache_connector.tiers.peer.registry import holders_key

    blocks_per_chunk = 256 // 32
    prompts = [random_prompt(tokens, seed=1 + i, vocab_size=VOCAB) for i in range(prompts_count)]
    results: dict = {"prompt_tokens": tokens, "prompts": prompts_count, "cpus": {"A": 0, "B and vLLM's cache": 1}}
    (REPO / ".cache").mkdir(exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=str(REPO / ".cache")) as tmp,
        redis_servers.redis_server(Path(tmp) / "redis") as server,
    ):

        def p2p_env() -> dict[str, str]:
            return {
                "LMCACHE_ENABLE_P2P": "True",
                "LMCACHE_LOOKUP_URL": f"redis://127.0.0.1:{server.port}",
                "LMCACHE_DISTRIBUTED_URL": f"127.0.0.1:{free_ports(1)}",
                # As the engine tests: with one core per engine on this shared machine, the default
                # 100 ms let a lookup time out now and then (a miss, the registry marked down).
                "LMCACHE_REMOTE_LOOKUP_TIMEOUT_MS": str(lookup_timeout_ms),
            }

        results.update(vllm_baseline(tmp, prompts, hits=max(3, prompts_count), cpus={1}))
        with bench_engine("lmcache_connector", tmp, env=p2p_env(), cpus={0}) as a:
            warm_up(a)
            results["ours_cold_storing_s"] = statistics.median(ttft(a, p)[0] for p in prompts)
            a.call("connector_state")  # the workers report their stores: held, so published
            names = []
            for p in prompts:
                ids = a.call("fingerprints", prompt=p)
                fps = ids["fingerprints"]
                keys = [fps[min(i + blocks_per_chunk, len(fps)) - 1] for i in range(0, len(fps), blocks_per_chunk)]
                names += [holders_key("lmc:", ids["namespace"], key) for key in keys]
            deadline = time.monotonic() + 30
            with server.admin() as admin:
                while not all(admin.scard(name) for name in names):
                    if time.monotonic() > deadline:
                        raise RuntimeError("engine A's chunks were never published")
                    time.sleep(0.05)
            with bench_engine("lmcache_connector", tmp, env=p2p_env(), cpus={1}) as b:
                warm_up(b)
                samples = []
                for p in prompts:
                    before = _peer_hits(b)
                    seconds, cached = ttft(b, p)
                    samples.append(
                        {"ttft_s": seconds, "cached_tokens": cached, "peer_hit_tokens": _peer_hits(b) - before}
                    )
                results["served_chunks_by_A"] = a.call("connector_state")["worker_totals"].get("served_chunks.peer", 0)
    results["from_peer"] = samples
    results["lookup_timeout_ms"] = lookup_timeout_ms
    results["misses"] = sum(1 for s in samples if not s["peer_hit_tokens"])  # recomputed: counted, not hidden
    results["from_peer_s"] = statistics.median(s["ttft_s"] for s in samples)
    results["ratio_to_prefix_hit"] = results["from_peer_s"] / results["vllm_prefix_hit_s"]
    results["ratio_to_cold"] = results["from_peer_s"] / results["cold_s"]
    results["target_ratio_to_prefix_hit"] = TARGET_TTFT
    print(
        f"  engine A cold, serving peers {results['ours_cold_storing_s']:.3f}s; engine B (new process) from A "
        f"{results['from_peer_s']:.3f}s ({results['ratio_to_prefix_hit']:.2f}x vLLM's hit, target <= {TARGET_TTFT}; "
        f"{results['ratio_to_cold']:.3f}x cold)  cached tokens {[s['cached_tokens'] for s in samples]}  "
        f"from the peer tier {[s['peer_hit_tokens'] for s in samples]}  "
        f"chunks A served {results['served_chunks_by_A']:.0f}; each TTFT "
        f"{[round(s['ttft_s'], 3) for s in samples]}",
        flush=True,
    )
    return results


def _peer_hits(engine) -> int:
    return engine.call("connector_state", settle=False)["totals"]["hit_tokens_by_tier"].get("peer", 0)


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=16, help="4 MiB chunks per fetch (at most 64: one request)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--ttft", action="store_true", help="also warm TTFT from a peer (three engines; minutes)")
    parser.add_argument("--prompts", type=int, default=5, help="4,000-token prompts for --ttft")
    parser.add_argument("--lookup-timeout-ms", type=int, default=300, help="LMCACHE_REMOTE_LOOKUP_TIMEOUT_MS")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "p2p_cpu.json"))
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"load average before {load[0]:.2f}", flush=True)
    results: dict = {"load_average_before": load[0]}
    print(f"1. peer fetch throughput ({args.chunks} chunks of 4 MiB, median of {args.repeats})", flush=True)
    results["throughput"] = throughput(args.chunks, args.repeats)
    if args.ttft:
        print(f"2. warm TTFT from a peer (bench model, {args.prompts} 4,000-token prompts)", flush=True)
        results["warm_ttft"] = warm_ttft(args.prompts, 4000, args.lookup_timeout_ms)
    results["load_average_after"] = os.getloadavg()[0]
    results["args"] = vars(args)
    print(f"load average after {results['load_average_after']:.2f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
