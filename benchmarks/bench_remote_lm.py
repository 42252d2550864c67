"""The remote tier on LMCache's cache server (``lm://``): store and load throughput against a raw socket.

One ``lmcache_server`` (LMCache 0.5.6's own, installed by ``scripts/setup.sh`` into
``.venv/lmcache-server`` and started on loopback as the tests start it: ``tests/lm_servers.py``)
serves the whole run. Chunks of the bench model (``bench_remote.py``): 4 MiB each, in the
chunk-buffer shape (8 regions x 8 blocks x 64 KiB rows, random bytes, each chunk its own buffer).

* ``store``: ``RemoteStore.submit_write`` of every chunk, then ``flush``: per batch of 8 an EXIST
  per chunk, then per chunk the header and xxh3 checksum, one PUT of the value, one PUT of its
  block entry (under the chunk's first block), and the HEALTH round trip that confirms them.
* ``load``: ``RemoteStore.read_into`` of every chunk, one at a time (the executor's fill thread):
  one GET read straight into a preallocated buffer per chunk (``get_into``: the header checked
  before the chunk's bytes are read, the checksum computed as they land).
* ceilings, same server, same run, the same bytes: a plain socket speaking the framing, with
  TCP_NODELAY. ``raw_put``: one PUT per chunk (header, then the chunk's buffer, uncopied), then
  one HEALTH round trip so the time includes the server storing them. ``raw_get``: per chunk a GET
  header, the response header and ``recv_into`` a preallocated buffer; measured with and without
  quick ACKs (without them the server's Nagle delay stalls each GET's tail), the faster is the
  ceiling; and ``raw_get_fresh``, each GET into a new buffer, as a client returning the value must
  (redis-py's ``GET`` in ``bench_remote.py`` does the same).
* the client alone, to tell its cost from the tier's (header, checksum, copy): ``client_put``
  (``LMServerClient.put`` of each chunk's buffer, each confirmed by its HEALTH round trip) and
  ``client_get`` (``LMServerClient.get``).

Every repeat writes fresh keys (new fingerprints), so the store's EXIST never skips a write. The
server keeps everything (it has no delete): ``--chunks`` x ``--repeats`` x 2 x 4 MiB stays in its
memory until the run ends. Medians of ``--repeats``; results to benchmarks/results/remote_lm_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import lm_servers  # noqa: E402
from remote_store_timing import Timings, time_loads, time_stores  # noqa: E402

from lmcache_connector.tiers.remote.lm_client import LMOptions, LMServerClient, value_key  # noqa: E402
from lmcache_connector.tiers.remote.store import RemoteStore  # noqa: E402
from lmcache_connector.urls import parse_remote_url  # noqa: E402

NS = "cd" * 16
RANK = "tp0pp0"  # the rank that also writes the block entries: the full cost of a store
REGIONS, BLOCKS, ROW = 8, 8, 64 * 1024  # one 256-token chunk of the bench model: 4 MiB
CHUNK_BYTES = REGIONS * BLOCKS * ROW
QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def recv_into(sock: socket.socket, view: memoryview, quickack: bool) -> None:
    got = 0
    while got < len(view):
        if quickack and QUICKACK is not None:
            sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError("the server closed the connection")
        got += n


def throughput(port: int, chunks: int, repeats: int) -> dict:
    data = [torch.randint(0, 256, (REGIONS, BLOCKS, ROW), dtype=torch.uint8) for _ in range(chunks)]
    into = [torch.empty_like(d) for d in data]
    regions = [[memoryview(r.numpy()).cast("B") for r in d] for d in data]
    into_regions = [[memoryview(r.numpy()).cast("B") for r in d] for d in into]
    flat = [memoryview(d.numpy()).cast("B") for d in data]
    flat_into = [memoryview(d.numpy()).cast("B") for d in into]
    url = parse_remote_url(f"lm://127.0.0.1:{port}")
    store = RemoteStore(
        LMServerClient(url, LMOptions(socket_timeout_secs=60)),
        NS,
        RANK,
        lambda blocks: (REGIONS, blocks, ROW),
        queue_chunks=max(chunks, 32),
    )
    raw = socket.create_connection(("127.0.0.1", port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    timed = Timings()
    seconds = timed.seconds

    def raw_put_all(keys: list[str]) -> None:
        for key, view in zip(keys, flat, strict=True):
            raw.sendall(lm_servers.request(1, key, len(view)))
            raw.sendall(view)
        raw.sendall(lm_servers.health_request())
        recv_into(raw, memoryview(bytearray(36)), quickack=True)

    def raw_get_all(keys: list[str], quickack: bool, fresh: bool = False) -> None:
        header = memoryview(bytearray(36))
        for key, view in zip(keys, flat_into, strict=True):
            raw.sendall(lm_servers.request(2, key))
            recv_into(raw, header, quickack)
            assert int.from_bytes(header[4:8], "little") == CHUNK_BYTES
            recv_into(raw, memoryview(bytearray(CHUNK_BYTES)) if fresh else view, quickack)

    client = LMServerClient(url, LMOptions(socket_timeout_secs=60))

    def client_put_all(keys: list[str]) -> None:
        for key, view in zip(keys, flat, strict=True):
            client.put(key, view)

    def client_get_all(keys: list[str]) -> None:
        for key in keys:
            assert len(client.get(key)) == CHUNK_BYTES

    for rep in range(repeats):
        fps = [[bytes.fromhex(f"{rep:08x}{c:08x}{b:016x}") for b in range(BLOCKS)] for c in range(chunks)]

        time_stores(store, timed, fps, regions, CHUNK_BYTES)
        time_loads(store, timed, fps, into_regions, data, into)

        keys = [f"raw@{rep}@0@{c:032x}@uint8" for c in range(chunks)]
        timed("raw_put", lambda keys=keys: raw_put_all(keys))
        timed("raw_get_quickack", lambda keys=keys: raw_get_all(keys, quickack=True))
        timed("raw_get_plain", lambda keys=keys: raw_get_all(keys, quickack=False))
        timed("raw_get_fresh", lambda keys=keys: raw_get_all(keys, quickack=True, fresh=True))
        ckeys = [value_key("lmc:", NS, "tp1pp0", f"{rep:08x}{c:024x}") for c in range(chunks)]
        timed("client_put", lambda ckeys=ckeys: client_put_all(ckeys))
        timed("client_get", lambda ckeys=ckeys: client_get_all(ckeys))
        assert all(torch.equal(a, b) for a, b in zip(data, into, strict=True)), "raw GETs returned other bytes"
    dropped = store.take_counts()
    store.close(10)
    client.close()
    raw.close()
    assert not dropped, f"the store counted {dropped}"

    total = chunks * CHUNK_BYTES
    gbps = {name: total / statistics.median(s) / 1e9 for name, s in seconds.items()}
    load_ceiling = max(gbps["raw_get_quickack"], gbps["raw_get_plain"])
    results = {
        "chunks": chunks,
        "chunk_bytes": CHUNK_BYTES,
        "repeats": repeats,
        "GBps": gbps,
        "store_ratio": gbps["store"] / gbps["raw_put"],
        "load_ratio": gbps["load"] / load_ceiling,
        "load_ratio_to_raw_get_fresh": gbps["load"] / gbps["raw_get_fresh"],
        "client_put_ratio": gbps["client_put"] / gbps["raw_put"],
        "client_get_ratio": gbps["client_get"] / gbps["raw_get_fresh"],
        "seconds": seconds,
    }
    print(
        f"  store: RemoteStore {gbps['store']:5.2f} GB/s  raw PUT {gbps['raw_put']:5.2f} GB/s  "
        f"ratio {results['store_ratio']:.2f} (target >= 0.7)",
        flush=True,
    )
    print(
        f"  load:  RemoteStore {gbps['load']:5.2f} GB/s  raw GET {gbps['raw_get_quickack']:5.2f} GB/s "
        f"(without quick ACKs {gbps['raw_get_plain']:5.2f} GB/s)  ratio to the faster "
        f"{results['load_ratio']:.2f} (target >= 0.7); to a raw GET into a fresh buffer "
        f"({gbps['raw_get_fresh']:5.2f} GB/s) {results['load_ratio_to_raw_get_fresh']:.2f}",
        flush=True,
    )
    print(
        f"  the client alone: put {gbps['client_put']:5.2f} GB/s ({results['client_put_ratio']:.2f}x raw PUT), "
        f"get {gbps['client_get']:5.2f} GB/s ({results['client_get_ratio']:.2f}x a raw GET into a fresh buffer)",
        flush=True,
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--ttft", action="store_true", help="also warm TTFT from lm:// (bench_remote.py's; minutes)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "remote_lm_cpu.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-lm-") as tmp, lm_servers.lm_server(Path(tmp)) as server:
        print(f"lmcache_server on port {server.port}; {args.chunks} chunks of {CHUNK_BYTES >> 20} MiB", flush=True)
        results = {"throughput": throughput(server.port, args.chunks, args.repeats)}
        if args.ttft:
            from bench_remote import warm_ttft

            print("warm TTFT from lm:// (bench model, 4,000-token prompts)", flush=True)
            results["warm_ttft"] = warm_ttft(tmp, f"lm://127.0.0.1:{server.port}", 3, 4000)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
