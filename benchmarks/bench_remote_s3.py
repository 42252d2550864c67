"""The remote tier on S3: store and load throughput through ``RemoteStore`` against raw boto3.

One ``moto_server`` (the test extra's S3 endpoint, started on loopback as the tests start it:
``tests/s3_servers.py``) serves the whole run; the figures are bounded by that server (pure Python,
about 0.1 GB/s), so they compare the tier's overhead with boto3's on the same endpoint rather than
measure S3.

Two chunk sizes, the same bytes each: the bench model's 4 MiB chunk, and an 8B-class model's
32 MiB (8 regions x 8 blocks x 64 or 512 KiB rows, random bytes, each chunk its own buffer). They
are stored by ``RemoteStore`` (``submit_write`` of every chunk, then ``flush``: the writer takes
them as one batch: a ``HEAD`` of each, header and xxh3 checksum, then each chunk's value ``PUT`` and
its one block-entry ``PUT``, 16 chunks at a time) and loaded by ``read_into`` (one ``GET``, header
check, checksum, copy into a preallocated buffer), one chunk at a time as the executor's fill
thread does. Against boto3 (default client settings) on the same server in the same run:
``put_object`` / ``get_object`` of the same bytes one chunk at a time (the issue's baseline);
``put_object`` 16 at a time (the most a threaded boto3 user gets); and boto3 making the tier's own
requests, which separates the client's overhead from the cost of the ``HEAD`` and the entry.
Every measurement writes fresh keys, so the store's ``HEAD`` never skips a write. Medians of
``--repeats``; results to benchmarks/results/remote_s3_cpu.json.

``--ttft`` adds warm TTFT from S3 against cold and vLLM's prefix-cache hit (``bench_remote.py``'s
measurement with the bench model and 4,000-token prompts; minutes on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import s3_servers  # noqa: E402
from remote_store_timing import Timings, time_loads, time_stores  # noqa: E402

from lmcache_connector.tiers.remote.s3_client import S3Options, connect_s3_with  # noqa: E402
from lmcache_connector.tiers.remote.store import RemoteStore  # noqa: E402
from lmcache_connector.urls import parse_remote_url  # noqa: E402

NS = "cd" * 16
RANK = "tp0pp0"  # the rank that also writes the block entries: the full cost of a store
REGIONS, BLOCKS = 8, 8
# Row bytes of a chunk: the bench model's (4 MiB chunks), and an 8B-class model's 256-token chunk
# (32 layers x K,V x 8 heads x 128 x bf16 = 128 KiB a token: 32 MiB).
SHAPES = {"bench_model_4MiB": 64 * 1024, "8B_class_32MiB": 512 * 1024}
BUCKET = "lmc-bench"


def throughput(server: s3_servers.MotoServer, chunks: int, repeats: int, row: int) -> dict:
    chunk_bytes = REGIONS * BLOCKS * row
    data = [torch.randint(0, 256, (REGIONS, BLOCKS, row), dtype=torch.uint8) for _ in range(chunks)]
    into = [torch.empty_like(d) for d in data]
    regions = [[memoryview(r.numpy()).cast("B") for r in d] for d in data]
    into_regions = [[memoryview(r.numpy()).cast("B") for r in d] for d in into]
    copies = [bytes(memoryview(d.numpy()).cast("B")) for d in data]  # what boto3 sends: made outside the timing
    url = parse_remote_url(f"s3://{BUCKET}/bench")
    store = RemoteStore(
        connect_s3_with(url, S3Options(timeout_secs=60.0)),
        NS,
        RANK,
        lambda blocks: (REGIONS, blocks, row),
        queue_chunks=max(chunks, 32),  # every chunk is submitted at once: none may be dropped
    )
    raw = server.admin()
    pool = ThreadPoolExecutor(16)  # as many requests in flight as the S3 client allows
    entry = b"e" * (33 * (BLOCKS + 1))  # a block entry's size
    timed = Timings()
    seconds = timed.seconds

    for rep in range(repeats):
        fps = [[bytes.fromhex(f"{rep:04x}{row:08x}{c:04x}{b:016x}") for b in range(BLOCKS)] for c in range(chunks)]

        time_stores(store, timed, fps, regions, chunk_bytes)
        time_loads(store, timed, fps, into_regions, data, into)

        keys = [f"raw/{row}/{rep}/{c}" for c in range(chunks)]

        def raw_put(keys=keys) -> None:
            for key, body in zip(keys, copies, strict=True):
                raw.put_object(Bucket=BUCKET, Key=key, Body=body)

        def raw_get(keys=keys) -> None:
            for key in keys:
                raw.get_object(Bucket=BUCKET, Key=key)["Body"].read()

        def raw_put_concurrent(keys=keys) -> None:
            """put_object of the same bytes, as many at once as the S3 client allows."""
            names = [key + "-concurrent" for key in keys]
            pairs = zip(names, copies, strict=True)
            list(pool.map(lambda pair: raw.put_object(Bucket=BUCKET, Key=pair[0], Body=pair[1]), pairs))

        def raw_put_objects(keys=keys) -> None:
            """The tier's requests for each chunk, without the tier, as many chunks at once as the
            tier sends: the HEADs, then each chunk's value and its one entry."""
            names = [key + "-objects" for key in keys]

            def head(name: str) -> None:
                try:
                    raw.head_object(Bucket=BUCKET, Key=name)
                except raw.exceptions.ClientError:
                    pass

            def put(pair: tuple[str, bytes]) -> None:
                raw.put_object(Bucket=BUCKET, Key=pair[0], Body=pair[1])
                raw.put_object(Bucket=BUCKET, Key=pair[0] + "-entry", Body=entry)

            list(pool.map(head, names))
            list(pool.map(put, zip(names, copies, strict=True)))

        timed("raw_put", raw_put)
        timed("raw_put_concurrent", raw_put_concurrent)
        timed("raw_put_objects", raw_put_objects)
        timed("raw_get", raw_get)
    dropped = store.take_counts()
    store.close(10)
    assert not dropped, f"the store counted {dropped}"

    pool.shutdown()
    total = chunks * chunk_bytes
    gbps = {name: total / statistics.median(s) / 1e9 for name, s in seconds.items()}
    results = {
        "chunks": chunks,
        "chunk_bytes": chunk_bytes,
        "repeats": repeats,
        "GBps": gbps,
        "store_ratio": gbps["store"] / gbps["raw_put"],
        "store_ratio_to_concurrent_puts": gbps["store"] / gbps["raw_put_concurrent"],
        "store_ratio_to_the_same_requests": gbps["store"] / gbps["raw_put_objects"],
        "load_ratio": gbps["load"] / gbps["raw_get"],
        "seconds": seconds,
    }
    print(
        f"  store: RemoteStore {gbps['store']:6.3f} GB/s  boto3 put_object {gbps['raw_put']:6.3f} GB/s  "
        f"ratio {results['store_ratio']:.2f} (target >= 0.7)",
        flush=True,
    )
    print(
        f"         boto3 put_object 16 at a time {gbps['raw_put_concurrent']:6.3f} GB/s  "
        f"ratio {results['store_ratio_to_concurrent_puts']:.2f}",
        flush=True,
    )
    print(
        f"         boto3 making the same requests (HEAD, value, entry) {gbps['raw_put_objects']:6.3f} GB/s  "
        f"ratio {results['store_ratio_to_the_same_requests']:.2f}",
        flush=True,
    )
    print(
        f"  load:  RemoteStore {gbps['load']:6.3f} GB/s  boto3 get_object {gbps['raw_get']:6.3f} GB/s  "
        f"ratio {results['load_ratio']:.2f} (target >= 0.7)",
        flush=True,
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=16, help="4 MiB chunks per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ttft", action="store_true", help="also warm TTFT from S3 (bench_remote.py's; minutes)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "remote_s3_cpu.json"))
    args = parser.parse_args()

    started = time.monotonic()
    (REPO / ".cache").mkdir(exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=str(REPO / ".cache")) as tmp,
        s3_servers.moto_server(Path(tmp) / "moto") as server,
    ):
        os.environ.update(server.env())  # this process's clients and any engine it starts
        server.create_bucket(BUCKET)
        print(f"moto_server on {server.endpoint}, bucket {BUCKET}", flush=True)
        results: dict = {"throughput": {}}
        for name, row in SHAPES.items():
            chunks = max(2, args.chunks * SHAPES["bench_model_4MiB"] // row)  # the same bytes for each shape
            print(f"1. store and load throughput, {name}: {chunks} chunks, median of {args.repeats}", flush=True)
            results["throughput"][name] = throughput(server, chunks, args.repeats, row)
        if args.ttft:
            from bench_remote import warm_ttft

            print("2. warm TTFT from S3 (bench model, 4,000-token prompts)", flush=True)
            results["warm_ttft"] = warm_ttft(tmp, f"s3://{BUCKET}/ttft", args.repeats, 4000)
    results["wall_s"] = time.monotonic() - started
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
