#!/usr/bin/env python3
"""One run on a CUDA machine: are the block-copy kernels and the GPU transfer path right, and how fast?

1. Correctness: the Triton gather/scatter against the torch reference for every KV layout
   (LBNHC, LBHNC, LHBNC, BLHNC, BLNHC, BHLNC), every dtype (bf16, fp16, fp32, fp8), MLA, odd block
   counts, unsorted ids, partial-chunk slot views, tiles that do not divide the row, narrow
   alignments, pinned host chunks; then :class:`CudaBlockMover` store/poll/load round trips; and a
   :class:`MemoryPool` of an odd size (3 x 45 MiB): registered with ``cudaHostRegister`` at exactly
   its size (not through PyTorch's power-of-two pinned allocator), device<->pool copies byte for
   byte, and as fast as a ``pin_memory=True`` buffer (target 0.9x).
2. Timings, each beside its ceiling measured in the same run: gather/scatter of 256-token chunks of
   a 7B-class cache (32 layers, 8 KV heads, head 128, bf16, block 16) against a device-to-device
   ``copy_`` of the same bytes, one chunk and 8 chunks per launch, contiguous and scattered block
   ids; a few tile/warp settings; host<->device stores and loads (CudaBlockMover and the raw kernel
   writing/reading pinned memory) against a plain pinned ``copy_``.
3. The compute-stream stall per stored chunk of one step's stores for a 32k-token prompt (128
   chunks): CudaBlockMover without and with ``prepare_stores``, against the same gathers alone.

Every check is guarded: a failure is recorded in the JSON and the run goes on. The JSON is
rewritten after every section, a watchdog ends the run past the time budget, and a summary table
is printed last. Needs only torch and triton (no vLLM): the views vLLM would hand the connector are
rebuilt here with ``as_strided`` (tests/test_ops_torch.py checks they match vLLM's).

    python3 benchmarks/gpu_check.py [RESULT.json] [--budget-s 300]
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --device cpu --quick   # dry run, no GPU

Default result path: ``$OUT/gpu_check.json`` if ``$OUT`` is set, else ``benchmarks/results/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Logical [L, B, H, N, C] axes in physical order, as vLLM's KVCacheLayout enum defines them.
LAYOUT_ORDERS = {
    "LBHNC": (0, 1, 2, 3, 4),
    "LBNHC": (0, 1, 3, 2, 4),
    "LHBNC": (0, 2, 1, 3, 4),
    "BLHNC": (1, 0, 2, 3, 4),
    "BLNHC": (1, 0, 3, 2, 4),
    "BHLNC": (1, 2, 0, 3, 4),
}
DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp8": getattr(torch, "float8_e4m3fn", torch.uint8),
}
SEVEN_B = dict(layers=32, heads=8, tokens=16, content=256, dtype=torch.bfloat16)  # head 128: K|V = 256
CHUNK_BLOCKS = 16  # 256 tokens / block 16
TARGET_DEVICE_RATIO = 0.8
TARGET_HOST_RATIO = 0.8


def make_layer_views(
    layout: str,
    layers: int,
    blocks: int,
    heads: int,
    tokens: int,
    content: int,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One flat uint8 buffer and the per-layer ``[B, H, N, C]`` views vLLM would carve out of it.

    Strides follow vLLM's ``compute_layout_strides`` for an unpadded spec: walk the layout's
    physical order from the innermost axis out, each axis' stride the size of everything inside.
    """
    elem = torch.empty(0, dtype=dtype).element_size()
    shape = (layers, blocks, heads, tokens, content * elem)  # C in bytes
    strides = [0] * 5
    size = 1
    for axis in reversed(LAYOUT_ORDERS[layout]):
        strides[axis] = size
        size *= shape[axis]
    flat = torch.empty(size, dtype=torch.uint8, device=device)
    view5 = flat.as_strided(shape, strides)
    return flat, {f"layer{i}": view5[i].view(dtype) for i in range(layers)}


# ---------------------------------------------------------------------------- bookkeeping


class Run:
    """Results, time budget, and the JSON file they are written to."""

    def __init__(self, path: Path, budget_s: float):
        self.path = path
        self.start = time.monotonic()
        self.budget_s = budget_s
        self.lock = threading.RLock()
        self.results: dict = {"meta": {}, "checks": [], "timings": [], "skipped": [], "errors": []}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def check(self, name: str, fn: Callable[[], object]) -> bool:
        started = time.monotonic()
        try:
            detail = fn()
            row = {"name": name, "ok": True}
            if detail is not None:
                row["detail"] = detail
        except Exception as exc:  # noqa: BLE001 - every failure is a result, never the end of the run
            row = {"name": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
            row["trace"] = traceback.format_exc()[-2000:]
        row["seconds"] = round(time.monotonic() - started, 3)
        with self.lock:
            self.results["checks"].append(row)
        return row["ok"]

    def timing(self, **row) -> None:
        with self.lock:
            self.results["timings"].append(row)

    def section(self, name: str, needs_s: float, fn: Callable[[], None]) -> None:
        if self.left() < needs_s:
            self.results["skipped"].append(f"{name}: {self.left():.0f} s left of the budget, needs ~{needs_s:.0f} s")
            print(f"[gpu_check] skip {name}: time budget", flush=True)
            return
        print(f"[gpu_check] {name} ({self.left():.0f} s left)", flush=True)
        started = time.monotonic()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            self.results["errors"].append(
                {
                    "section": name,
                    "error": f"{type(exc).__name__}: {exc}"[:500],
                    "trace": traceback.format_exc()[-3000:],
                }
            )
        self.results["meta"].setdefault("section_seconds", {})[name] = round(time.monotonic() - started, 1)
        self.save()

    def save(self) -> None:
        with self.lock:
            self.results["meta"]["elapsed_s"] = round(time.monotonic() - self.start, 1)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.results, indent=1, default=str))
            tmp.replace(self.path)

    @staticmethod
    def _compact_lines(timings: list[dict]) -> list[str]:
        """One line each for the rows kept out of the table: host ceilings, launch cost, best tiles."""
        lines = []
        ceilings = [
            f"{t['name'].removeprefix('pinned copy_ ')} {t['gbps']:.1f}"
            for t in timings
            if t.get("kind") == "host-ceiling"
        ]
        if ceilings:
            lines.append("pinned copy_ GB/s: " + ", ".join(ceilings))
        for t in timings:
            if t.get("kind") == "launch":
                lines.append(f"{t['name']}: host {t['host_us_per_call']} us/call, wall {t['wall_us_per_call']} us/call")
        stall = [t for t in timings if t.get("kind") == "stall"]
        if stall:
            head = stall[0]
            lines.append(
                f"store stall, {head['prompt_tokens']}-token prompt ({head['chunks']} chunks of "
                f"{head['chunk_bytes'] >> 20} MiB), compute stream per chunk:"
            )
            for t in stall:
                if "stall_us_per_chunk" in t:
                    meets = {None: "", True: " ok", False: " MISS"}[t.get("meets")]
                    lines.append(
                        f"  {t['name'].removeprefix('store stall: '):<42} stall {t['stall_us_per_chunk']:8.1f} us, "
                        f"x{t['ratio_vs_gathers']:.2f} the gathers, {t['staging_buffers']} buffers"
                        f"{' (host-bound)' if t.get('host_bound') else ''}{meets}"
                    )
                else:
                    lines.append(f"  {t['name'].removeprefix('store stall: '):<42} {t['us_per_chunk']:8.1f} us")
        best: dict[str, dict] = {}
        for t in timings:
            if t.get("kind") == "tune":
                key = " ".join(t["name"].split()[1:3])
                if key not in best or t["gbps"] > best[key]["gbps"]:
                    best[key] = t
        for key, t in best.items():
            lines.append(
                f"best tile {key}: {t['tile_bytes'] // 1024} KiB x {t['num_warps']} warps {t['gbps']:.1f} GB/s"
            )
        return lines

    def summary(self) -> str:
        with self.lock:
            checks, timings = list(self.results["checks"]), list(self.results["timings"])
            lines = [f"== gpu_check summary ({self.results['meta'].get('device', '?')}) =="]
            failed = [c for c in checks if not c["ok"]]
            lines.append(f"checks: {len(checks) - len(failed)}/{len(checks)} passed")
            for c in failed[:15]:
                lines.append(f"  FAIL {c['name']}: {c['error'][:150]}")
            for e in self.results["errors"]:
                lines.append(f"  SECTION ERROR {e['section']}: {e['error'][:150]}")
            for s in self.results["skipped"]:
                lines.append(f"  skipped {s}")
            if timings:
                lines.append(f"{'timing':<44} {'GB/s':>8} {'ceiling':>8} {'ratio':>6} {'target':>6}")
                for t in timings:
                    if t.get("summary", True) is False:
                        continue
                    ratio = "" if t.get("ratio") is None else f"{t['ratio']:.2f}"
                    meets = {None: "", True: "ok", False: "MISS"}[t.get("meets")]
                    lines.append(
                        f"{t['name'][:44]:<44} {t.get('gbps', 0):8.1f} {t.get('ceiling_gbps', 0):8.1f} "
                        f"{ratio:>6} {meets:>6}"
                    )
            lines.extend(self._compact_lines(timings))
            lines.append(f"json: {self.path}   elapsed {time.monotonic() - self.start:.0f} s")
            return "\n".join(lines)


def median_wall_ms(fn: Callable[[], None], sync: Callable[[], None], reps: int, warmup: int = 2) -> float:
    """Median host wall-clock of ``fn(); sync()``: for work that spans several streams."""
    for _ in range(warmup):
        fn()
        sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def device_ms(fn: Callable[[], None], device: str, quick: bool) -> float:
    """Median device time of ``fn`` (CUDA events through triton's do_bench, L2 flushed between runs)."""
    if device != "cuda":
        return median_wall_ms(fn, lambda: None, reps=3 if quick else 9, warmup=1)
    import triton.testing

    try:
        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    except TypeError:  # an older do_bench without return_mode
        return float(triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=[0.5])[0])


def ratio_row(run: Run, name: str, nbytes: int, ms: float, ceiling_ms: float, target: float | None, **extra) -> None:
    gbps, ceiling = nbytes / ms / 1e6, nbytes / ceiling_ms / 1e6
    ratio = round(gbps / ceiling, 3)
    row = dict(name=name, bytes=nbytes, ms=round(ms, 4), gbps=round(gbps, 1), ceiling_gbps=round(ceiling, 1))
    row.update(ratio=ratio, target=target, meets=None if target is None else ratio >= target, **extra)
    run.timing(**row)


# ---------------------------------------------------------------------------- correctness


def correctness_cases() -> list[tuple[str, dict]]:
    """(name, make_layer_views kwargs): every layout x dtype, plus MLA (H=1, C=576)."""
    cases = []
    for layout in LAYOUT_ORDERS:
        for dname, dtype in DTYPES.items():
            cases.append(
                (f"{layout}-{dname}", dict(layout=layout, layers=3, heads=2, tokens=16, content=256, dtype=dtype))
            )
        cases.append(
            (f"{layout}-MLA-bf16", dict(layout=layout, layers=3, heads=1, tokens=16, content=576, dtype=torch.bfloat16))
        )
    cases.append(
        ("LBNHC-MLA-fp8", dict(layout="LBNHC", layers=3, heads=1, tokens=16, content=656, dtype=DTYPES["fp8"]))
    )
    return cases


def check_layout_case(kw: dict, device: str, blocks: int, rng: random.Random) -> dict:
    from lmcache_connector import ops
    from lmcache_connector.ops import reference, triton_kernels
    from lmcache_connector.ops.paged_kv import PagedKV

    flat, views = make_layer_views(blocks=blocks, device=device, **kw)
    flat.random_(0, 256)
    paged = PagedKV.from_layer_views(views)
    shape = lambda n: paged.chunk_shape(n)  # noqa: E731

    def poisoned(n: int, value: int) -> torch.Tensor:
        return torch.full(shape(n), value, dtype=torch.uint8, device=device)

    # Gather, unsorted odd count: kernel and reference outputs poisoned differently, so a byte
    # that neither wrote still differs.
    ids = rng.sample(range(blocks), 13)
    out, ref = poisoned(13, 0xA5), poisoned(13, 0x5A)
    triton_kernels.gather_blocks_triton(paged, ids, out)
    reference.gather_blocks_torch(paged, ids, ref)
    assert torch.equal(out, ref), f"gather of unsorted ids {ids} differs from the reference"

    # Gather, contiguous ids, through the dispatcher, into a partial slot view at block offset 3.
    first = rng.randrange(blocks - 5)
    ids_c = list(range(first, first + 5))
    slot = torch.full((paged.num_regions, 16, paged.row_bytes), 0xA5, dtype=torch.uint8, device=device)
    view = slot[:, 3:8]
    ops.gather_blocks(paged, ids_c, view)
    ref = poisoned(5, 0x5A)
    reference.gather_blocks_torch(paged, ids_c, ref)
    assert torch.equal(view, ref), "gather of contiguous ids into a partial slot view differs"
    assert (slot[:, :3] == 0xA5).all() and (slot[:, 8:] == 0xA5).all(), "gather wrote outside its slot view"

    # Tiles that do not divide the row (masked last tile).
    out, ref = poisoned(13, 0xA5), poisoned(13, 0x5A)
    triton_kernels.gather_blocks_triton(paged, ids, out, tile_bytes=max(16, paged.row_bytes // 3))
    reference.gather_blocks_torch(paged, ids, ref)
    assert torch.equal(out, ref), "gather with a tile that does not divide the row differs"

    # Scatter: whole storage must equal the reference's (right rows written, nothing else).
    chunk = torch.randint(0, 256, shape(13), dtype=torch.uint8, device=device)
    before = flat.clone()
    triton_kernels.scatter_blocks_triton(chunk, paged, ids)
    got = flat.clone()
    flat.copy_(before)
    reference.scatter_blocks_torch(chunk, paged, ids)
    assert torch.equal(got, flat), "scatter of unsorted ids differs from the reference"
    assert not torch.equal(got, before), "scatter changed nothing"

    # Scatter from a partial slot view, contiguous ids, through the dispatcher.
    slot.random_(0, 256)
    view = slot[:, 3:8]
    flat.copy_(before)
    ops.scatter_blocks(view, paged, ids_c)
    got = flat.clone()
    flat.copy_(before)
    reference.scatter_blocks_torch(view.contiguous(), paged, ids_c)
    assert torch.equal(got, flat), "scatter of contiguous ids from a partial slot view differs"

    # Round trip through the layer views: blocks src -> chunk -> blocks dst.
    flat.copy_(before)
    src, dst = ids[:6], ids[6:12]
    # Compared as bytes: indexing float8 tensors is not supported everywhere.
    expect = {name: v.view(torch.uint8)[src].clone() for name, v in views.items()}
    mid = poisoned(6, 0xA5)
    triton_kernels.gather_blocks_triton(paged, src, mid)
    triton_kernels.scatter_blocks_triton(mid, paged, dst)
    for name, v in views.items():
        assert torch.equal(v.view(torch.uint8)[dst], expect[name]), f"round trip changed layer {name}"
    return {
        "regions": paged.num_regions,
        "row_bytes": paged.row_bytes,
        "unit_bytes": triton_kernels.copy_unit_bytes(paged, out),
    }


def check_narrow_units(device: str) -> dict:
    """Rows whose size allows only 8/4/2/1-byte words (and a misaligned chunk) copy right too."""
    from lmcache_connector.ops import reference, triton_kernels
    from lmcache_connector.ops.paged_kv import PagedKV

    units = {}
    for row in (15, 6, 12, 24, 48, 16 * 1030):
        blocks, stride = 11, 2 * row
        storage = torch.randint(0, 256, (2 * blocks * stride + 7,), dtype=torch.uint8, device=device)
        paged = PagedKV(storage, [0, blocks * stride], stride, row, blocks)
        ids = [9, 2, 5, 0, 7]
        backing = torch.full((2 * 5 * row + 1,), 0xA5, dtype=torch.uint8, device=device)
        out = backing[1:].view(2, 5, row) if row % 2 else backing[: 2 * 5 * row].view(2, 5, row)
        ref = torch.full((2, 5, row), 0x5A, dtype=torch.uint8, device=device)
        triton_kernels.gather_blocks_triton(paged, ids, out)
        reference.gather_blocks_torch(paged, ids, ref)
        assert torch.equal(out, ref), f"gather with {row}-byte rows differs"
        before = storage.clone()
        chunk = torch.randint(0, 256, (2, 5, row), dtype=torch.uint8, device=device)
        triton_kernels.scatter_blocks_triton(chunk, paged, ids)
        got = storage.clone()
        storage.copy_(before)
        reference.scatter_blocks_torch(chunk, paged, ids)
        assert torch.equal(got, storage), f"scatter with {row}-byte rows differs"
        units[row] = triton_kernels.copy_unit_bytes(paged, out)
    return {"unit_bytes_by_row": units}


def check_pinned_direct(device: str) -> None:
    """The kernels read and write pinned host memory directly (zero-copy) and match the reference."""
    from lmcache_connector.ops import reference, triton_kernels
    from lmcache_connector.ops.paged_kv import PagedKV

    flat, views = make_layer_views("LBNHC", 4, 32, 2, 16, 256, torch.bfloat16, device)
    flat.random_(0, 256)
    paged = PagedKV.from_layer_views(views)
    ids = [30, 1, 17, 4, 22, 9, 11]
    host = torch.full(paged.chunk_shape(7), 0xA5, dtype=torch.uint8).pin_memory()
    triton_kernels.gather_blocks_triton(paged, ids, host)
    torch.cuda.synchronize()
    ref = torch.full(paged.chunk_shape(7), 0x5A, dtype=torch.uint8, device=device)
    reference.gather_blocks_torch(paged, ids, ref)
    assert torch.equal(host, ref.cpu()), "gather into pinned host memory differs"
    host.random_(0, 256)
    before = flat.clone()
    triton_kernels.scatter_blocks_triton(host, paged, ids)
    got = flat.clone()
    flat.copy_(before)
    reference.scatter_blocks_torch(host.to(device), paged, ids)
    assert torch.equal(got, flat), "scatter from pinned host memory differs"


POOL_SLOTS, POOL_CHUNK = 3, (5, 9, 1 << 20)  # 3 x 45 MiB = 135 MiB: PyTorch's pinned allocator would take 256
POOL_CHUNK_QUICK = (5, 9, 17 * 4096)  # 3 x 3 MiB, for dry runs
TARGET_POOL_RATIO = 0.9


def _driver_range(ptr: int) -> dict:
    """What the CUDA driver knows of the host range holding ``ptr`` (cuPointerGetAttribute)."""
    import ctypes

    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return {"error": f"libcuda.so.1: {exc}"}
    get = libcuda.cuPointerGetAttribute
    get.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64]
    get.restype = ctypes.c_int
    memory_type, start, size = ctypes.c_uint(0), ctypes.c_uint64(0), ctypes.c_size_t(0)
    queries = ((memory_type, 2), (start, 11), (size, 12))  # MEMORY_TYPE, RANGE_START_ADDR, RANGE_SIZE
    status = [get(ctypes.byref(value), attribute, ptr) for value, attribute in queries]
    return {"status": status, "memory_type": memory_type.value, "start": start.value, "size": size.value}


def check_pool_pinning(run: Run, device: str, quick: bool) -> dict:
    """MemoryPool of an odd size: registered (pinned) at exactly its configured size, copies right and fast."""
    from lmcache_connector.tiers.memory.pool import MemoryPool

    cuda = device == "cuda"
    stats = getattr(torch.cuda, "host_memory_stats", None) if cuda else None

    def host_bytes() -> dict:
        return {k: v for k, v in (stats() if stats else {}).items() if "bytes" in k and k.endswith(".current")}

    chunk = POOL_CHUNK_QUICK if quick else POOL_CHUNK
    before = host_bytes()
    pool = MemoryPool(POOL_SLOTS, chunk)
    after = host_bytes()
    configured = POOL_SLOTS * chunk[0] * chunk[1] * chunk[2]
    page = os.sysconf("SC_PAGE_SIZE")
    detail: dict = {"configured_bytes": configured, "mapped_bytes": pool.mapped_bytes, "pinned": pool.pinned}
    assert pool.nbytes == configured, f"pool.nbytes {pool.nbytes} != {configured}"
    assert pool.mapped_bytes == -(-configured // page) * page, "the pool maps more than its size rounded to a page"
    assert pool.pinned is cuda, f"pool.pinned is {pool.pinned} on {device}"
    detail["host_allocator_delta_bytes"] = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert not any(detail["host_allocator_delta_bytes"].values()), "the pool went through the caching host allocator"
    flat = pool.buffer.view(-1)
    if cuda:
        assert flat[:1].is_pinned() and flat[-1:].is_pinned(), "the pool's first or last byte is not pinned"
        ptr = flat.data_ptr()
        detail["driver_range"] = driver = _driver_range(ptr)
        detail["driver_beyond"] = _driver_range(ptr + pool.mapped_bytes)
        # Recorded, not asserted: how the driver reports a registered host range is not documented.
        detail["driver_range_matches"] = (driver.get("start"), driver.get("size")) == (ptr, pool.mapped_bytes)
        # What pin_memory=True would have locked for the same bytes (power-of-two rounding).
        ref_before = host_bytes()
        pinned_ref = torch.empty(pool.buffer.shape, dtype=torch.uint8, pin_memory=True)
        detail["pin_memory_delta_bytes"] = {k: v - ref_before.get(k, 0) for k, v in host_bytes().items()}

    # Copies: device -> every slot -> device, byte for byte.
    slot_shape = pool.slot(0).shape
    source = torch.randint(0, 256, (POOL_SLOTS, *slot_shape), dtype=torch.uint8, device=device)
    back = torch.empty_like(source)
    for i in range(POOL_SLOTS):
        pool.slot(i).copy_(source[i], non_blocking=True)
    if cuda:
        torch.cuda.synchronize()
    for i in range(POOL_SLOTS):
        back[i].copy_(pool.slot(i), non_blocking=True)
    assert torch.equal(back, source), "device -> pool -> device changed bytes"
    assert torch.equal(pool.buffer, source.cpu()), "the pool holds the wrong bytes"

    if cuda:  # one slot each way, against a plain pin_memory=True buffer of the same bytes
        sync, reps = torch.cuda.synchronize, 5 if quick else 15
        nbytes = pool.slot_bytes
        for label, host in (("pool", pool.slot(1)), ("pin_memory", pinned_ref[1])):
            for op, fn in (
                ("D2H", lambda host=host: host.copy_(source[1], non_blocking=True)),
                ("H2D", lambda host=host: back[1].copy_(host, non_blocking=True)),
            ):
                detail[f"{label}_{op}_ms"] = median_wall_ms(fn, sync, reps)
        for op in ("D2H", "H2D"):
            ratio_row(
                run,
                f"pool {op} 1 slot ({nbytes / 2**20:.0f} MiB)",
                nbytes,
                detail[f"pool_{op}_ms"],
                detail[f"pin_memory_{op}_ms"],
                TARGET_POOL_RATIO,
                kind="pool",
                ceiling="pin_memory=True copy_ of the same bytes",
            )
    pool.close()
    run.results["meta"]["pool_pinning"] = {k: v for k, v in detail.items() if not k.endswith("_ms")}
    return detail


def check_mover(device: str) -> dict:
    """CudaBlockMover: async stores (ring reuse, partial chunks, blocks overwritten right after the
    store call), poll/wait reporting, and loads into partial slot views."""
    from lmcache_connector.ops import reference
    from lmcache_connector.ops.cuda_mover import CudaBlockMover
    from lmcache_connector.ops.mover import make_block_mover
    from lmcache_connector.ops.paged_kv import PagedKV
    from lmcache_connector.tiers.memory.pool import MemoryPool

    flat, views = make_layer_views("LBNHC", 4, 96, 2, 16, 256, torch.bfloat16, device)
    flat.random_(0, 256)
    paged = PagedKV.from_layer_views(views)
    assert isinstance(make_block_mover(paged), CudaBlockMover), "make_block_mover did not pick CudaBlockMover"
    mover = CudaBlockMover(paged, store_buffers=2, load_buffers=2)
    pool = MemoryPool(8, paged.chunk_shape(8))
    pool.buffer.fill_(0xA5)
    rng = random.Random(1)
    plans = [(s, rng.sample(range(96), 8 if s != 3 else 3)) for s in range(6)]
    expected = {}
    for slot, ids in plans:
        ref = torch.empty(paged.chunk_shape(len(ids)), dtype=torch.uint8, device=device)
        reference.gather_blocks_torch(paged, ids, ref)
        expected[slot] = ref.cpu()
        mover.store(ids, pool.slot(slot, len(ids)), store_id=100 + slot, slot=slot)
        # The forward of the next step reuses the blocks at once: the store must not see it.
        for region in paged.regions:
            region[ids] = 0
    flat_after = flat.clone()
    reported: list[int] = []
    deadline = time.monotonic() + 20
    while len(reported) < len(plans) and time.monotonic() < deadline:
        reported += mover.poll_stores()
        time.sleep(0.0005)
    reported += mover.wait_stores()
    assert reported == [100 + s for s, _ in plans], f"store ids reported as {reported}"
    for slot, ids in plans:
        assert torch.equal(pool.slot(slot, len(ids)), expected[slot]), f"slot {slot} holds the wrong bytes"
    assert (pool.slot(3)[:, 3:] == 0xA5).all(), "a partial store wrote past its blocks"
    assert mover.poll_stores() == [] and mover.wait_stores() == [], "stores reported twice"

    # Loads: whole slot, then blocks 2..6 of a slot (a partial, offset view), into fresh blocks.
    targets = [(0, 0, 8, list(range(40, 48))), (1, 2, 5, [90, 50, 60, 70, 80])]
    for slot, first, count, ids in targets:
        mover.load(pool.slot(slot, count, first), ids, slot=slot)
        got = torch.empty(paged.chunk_shape(count), dtype=torch.uint8, device=device)
        reference.gather_blocks_torch(paged, ids, got)  # same stream: ordered after the load
        assert torch.equal(got.cpu(), expected[slot][:, first : first + count]), f"load of slot {slot} differs"
    untouched = torch.ones(flat.numel(), dtype=torch.bool, device=device)
    for *_, ids in targets:
        for region_offset in paged.region_offsets:
            for b in ids:
                start = region_offset + b * paged.block_stride
                untouched[start : start + paged.row_bytes] = False
    assert torch.equal(flat[untouched], flat_after[untouched]), "a load wrote outside its blocks"
    return {"pinned_pool": pool.pinned}


# ---------------------------------------------------------------------------- timings


def time_device_copies(run: Run, device: str, quick: bool) -> None:
    """Gather/scatter of a 7B-class cache vs device copy_ of the same bytes."""
    cfg = dict(SEVEN_B, layers=4, heads=2) if quick else dict(SEVEN_B)
    blocks = 64 if quick else 1024  # 1024 blocks x 2 MiB = 2 GiB: far beyond L2
    layouts = ("LBNHC",) if quick else ("LBNHC", "LHBNC", "BLHNC")
    rng = random.Random(2)
    for layout in layouts:
        if run.left() < 40:
            run.results["skipped"].append(f"device timings for {layout}: time budget")
            continue
        _time_layout(run, layout, cfg, blocks, device, quick, rng)
        if device == "cuda":
            torch.cuda.empty_cache()


def _time_layout(run: Run, layout: str, cfg: dict, blocks: int, device: str, quick: bool, rng: random.Random) -> None:
    from lmcache_connector.ops.paged_kv import PagedKV

    flat, views = make_layer_views(layout, blocks=blocks, device=device, **cfg)
    flat.random_(0, 256)
    paged = PagedKV.from_layer_views(views)
    sizes = (1,) if quick else (1, 8)  # chunks per launch
    for chunks in sizes:
        _time_size(run, layout, flat, paged, chunks, device, quick, rng, tune=layout == "LBNHC" and chunks == 8)


def _time_size(run, layout, flat, paged, chunks, device, quick, rng, tune) -> None:
    from lmcache_connector.ops import triton_kernels

    blocks = paged.num_blocks
    n = chunks * CHUNK_BLOCKS
    nbytes = paged.num_regions * n * paged.row_bytes
    rotate = 2 if quick else 4  # buffers and id sets cycled through, on top of do_bench's L2 flush
    outs = [torch.empty(paged.chunk_shape(n), dtype=torch.uint8, device=device).random_(0, 256) for _ in range(rotate)]
    starts = [rng.randrange(blocks - n + 1) for _ in range(rotate)]
    patterns = {
        "contiguous": [list(range(s, s + n)) for s in starts],
        "scattered": [rng.sample(range(blocks), n) for _ in range(rotate)],
    }
    counter = [0]

    def next_k() -> int:
        counter[0] = (counter[0] + 1) % rotate
        return counter[0]

    def copy_in() -> None:
        k = next_k()
        outs[k].view(-1).copy_(flat[k * nbytes : (k + 1) * nbytes])

    def copy_out() -> None:
        k = next_k()
        flat[k * nbytes : (k + 1) * nbytes].copy_(outs[k].view(-1))

    def kernel(op: str, id_sets: list[list[int]], **options) -> Callable[[], None]:
        def step() -> None:
            k = next_k()
            if op == "gather":
                triton_kernels.gather_blocks_triton(paged, id_sets[k], outs[k], **options)
            else:
                triton_kernels.scatter_blocks_triton(outs[k], paged, id_sets[k], **options)

        return step

    ceiling = {"gather": device_ms(copy_in, device, quick), "scatter": device_ms(copy_out, device, quick)}
    for pattern, id_sets in patterns.items():
        for op in ("gather", "scatter"):
            ratio_row(
                run,
                f"{op} {layout} {pattern} {chunks}ch",
                nbytes,
                device_ms(kernel(op, id_sets), device, quick),
                ceiling[op],
                TARGET_DEVICE_RATIO if chunks > 1 or quick else None,
                kind="device",
                op=op,
                layout=layout,
                pattern=pattern,
                chunks=chunks,
                blocks_per_launch=n,
                regions=paged.num_regions,
                row_bytes=paged.row_bytes,
                ceiling="device copy_ of the same bytes",
            )
    if chunks == 1 and device == "cuda":
        # Host cost per call: back-to-back one-chunk gathers, no sync in between.
        step, calls = kernel("gather", patterns["scattered"]), 200
        step()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(calls):
            step()
        host_us = (time.perf_counter() - started) / calls * 1e6
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - started) / calls * 1e6
        run.timing(
            name=f"gather {layout} scattered 1ch back-to-back",
            kind="launch",
            host_us_per_call=round(host_us, 1),
            wall_us_per_call=round(wall_us, 1),
            gbps=round(nbytes / wall_us / 1e3, 1),
            summary=False,
        )
    if tune:
        # A few (tile bytes, warps) settings on the batched LBNHC case; the default is 16 KiB, 4.
        for tile_bytes, warps in ((8192, 4), (16384, 8), (32768, 8), (65536, 8)):
            if run.left() < 30:
                run.results["skipped"].append("tile tuning: time budget")
                return
            for pattern, id_sets in patterns.items():
                for op in ("gather", "scatter"):
                    try:
                        ms = device_ms(kernel(op, id_sets, tile_bytes=tile_bytes, num_warps=warps), device, quick)
                    except Exception as exc:  # noqa: BLE001
                        run.results["errors"].append({"section": f"tile {tile_bytes}/{warps}", "error": str(exc)[:300]})
                        continue
                    ratio_row(
                        run,
                        f"tune {op} {pattern} tile{tile_bytes // 1024}K w{warps}",
                        nbytes,
                        ms,
                        ceiling[op],
                        None,
                        kind="tune",
                        tile_bytes=tile_bytes,
                        num_warps=warps,
                        summary=False,
                    )


def time_host_copies(run: Run, device: str, quick: bool) -> None:
    """Host<->device: CudaBlockMover and the raw kernel on pinned slots vs a plain pinned copy_."""
    from lmcache_connector.ops import triton_kernels
    from lmcache_connector.ops.cuda_mover import CudaBlockMover
    from lmcache_connector.ops.paged_kv import PagedKV
    from lmcache_connector.tiers.memory.pool import MemoryPool

    cfg = dict(SEVEN_B, layers=4) if quick else SEVEN_B
    blocks = 128 if quick else 512
    flat, views = make_layer_views("LBNHC", blocks=blocks, device=device, **cfg)
    flat.random_(0, 256)
    paged = PagedKV.from_layer_views(views)
    shape = paged.chunk_shape(CHUNK_BLOCKS)
    chunk_bytes = shape[0] * shape[1] * shape[2]
    slots = 4 if quick else 8
    pool = MemoryPool(slots, shape)
    pool.buffer.random_(0, 256)
    run.results["meta"]["host_pool_pinned"] = pool.pinned
    device_chunks = torch.empty(slots * chunk_bytes, dtype=torch.uint8, device=device).random_(0, 256)
    mover = CudaBlockMover(paged)
    rng = random.Random(3)
    patterns = {
        "contiguous": [list(range(i * CHUNK_BLOCKS, (i + 1) * CHUNK_BLOCKS)) for i in range(slots)],
        "scattered": [rng.sample(range(blocks), CHUNK_BLOCKS) for _ in range(slots)],
    }
    reps = {1: 15, slots: 5}

    def device_chunk(i: int) -> torch.Tensor:
        return device_chunks[i * chunk_bytes : (i + 1) * chunk_bytes].view(shape)

    def over_chunks(chunks: int, copy_one: Callable[[int], None], then: Callable[[], object] = lambda: None):
        def fn() -> None:
            for i in range(chunks):
                copy_one(i)
            then()

        return fn

    for chunks in (1, slots):
        nbytes = chunks * chunk_bytes
        d2h = over_chunks(chunks, lambda i: pool.slot(i).copy_(device_chunk(i), non_blocking=True))
        h2d = over_chunks(chunks, lambda i: device_chunk(i).copy_(pool.slot(i), non_blocking=True))
        ceiling = {
            "store": median_wall_ms(d2h, torch.cuda.synchronize, reps[chunks]),
            "load": median_wall_ms(h2d, torch.cuda.synchronize, reps[chunks]),
        }
        for op, ms in ceiling.items():
            run.timing(
                name=f"pinned copy_ {'D2H' if op == 'store' else 'H2D'} {chunks}ch",
                kind="host-ceiling",
                bytes=nbytes,
                ms=round(ms, 4),
                gbps=round(nbytes / ms / 1e6, 1),
                summary=False,
            )
        for pattern, ids in patterns.items():
            variants = (
                (
                    "mover store",
                    "store",
                    lambda i, ids=ids: mover.store(ids[i], pool.slot(i), store_id=i),
                    mover.wait_stores,
                ),
                ("mover load", "load", lambda i, ids=ids: mover.load(pool.slot(i), ids[i])),
                (
                    "kernel->pinned store",
                    "store",
                    lambda i, ids=ids: triton_kernels.gather_blocks_triton(paged, ids[i], pool.slot(i)),
                ),
                (
                    "kernel<-pinned load",
                    "load",
                    lambda i, ids=ids: triton_kernels.scatter_blocks_triton(pool.slot(i), paged, ids[i]),
                ),
            )
            for label, op, copy_one, *then in variants:
                if run.left() < 15:
                    run.results["skipped"].append(f"host timing {label} {pattern} {chunks}ch: time budget")
                    continue
                try:
                    ms = median_wall_ms(over_chunks(chunks, copy_one, *then), torch.cuda.synchronize, reps[chunks])
                except Exception as exc:  # noqa: BLE001
                    error = f"{type(exc).__name__}: {exc}"[:300]
                    run.results["errors"].append({"section": f"host {label}", "error": error})
                    continue
                ratio_row(
                    run,
                    f"{label} {pattern} {chunks}ch",
                    nbytes,
                    ms,
                    ceiling[op],
                    TARGET_HOST_RATIO if label.startswith("mover") else None,
                    kind="host",
                    pattern=pattern,
                    chunks=chunks,
                    ceiling=f"pinned copy_ {'D2H' if op == 'store' else 'H2D'} of the same bytes",
                )
    mover.wait_stores()


STALL_PROMPT_TOKENS = 32768
CHUNK_TOKENS = 256
TARGET_STALL_RATIO = 1.2  # compute-stream time of a step's stores / of its gathers alone, with room for the step


class _WallEvent:
    """Dry-run stand-in for a timing CUDA event: the host clock when it is recorded."""

    def record(self, stream=None) -> None:
        self.at = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: _WallEvent) -> float:
        return (end.at - self.at) * 1e3


class _DoneAtOnce:
    """A stream or event of the dry run's stand-in device, whose work is done when it is issued."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def record(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


def _dry_run_device_api():
    """CudaBlockMover's device API on CPU for the dry run: the copies run at once (no real streams)."""
    import contextlib

    from lmcache_connector.ops.cuda_mover import TorchCuda

    class CopiesAtOnce(TorchCuda):
        def on_device(self):
            return contextlib.nullcontext()

        def new_stream(self) -> _DoneAtOnce:
            return _DoneAtOnce()

        new_event = current_stream = new_stream

        def on_stream(self, stream):
            return contextlib.nullcontext()

    return CopiesAtOnce(torch.device("cpu"))


def time_store_stall(run: Run, device: str, quick: bool) -> None:
    """Compute-stream stall per stored chunk: all stores of one step of a 32k-token prompt.

    On the caller's (compute) stream a store is a gather into a staging buffer, plus a wait for an
    earlier chunk's copy to the host when the staging ring has no free buffer. The stream's time
    for the step's stores is measured between two events on it, while a sleep kernel ahead of
    them holds the stream until the host has queued everything (so host time is not counted);
    the same gathers into 4 device buffers, with no copy to the host, are the ceiling. Variants:
    no ``prepare_stores`` (the ring of 4), ``prepare_stores`` under the default cap, and under a
    cap that fits the whole step.
    """
    from lmcache_connector import ops
    from lmcache_connector.ops.cuda_mover import DEFAULT_MAX_STAGING_BYTES, DEFAULT_STORE_BUFFERS, CudaBlockMover
    from lmcache_connector.ops.paged_kv import PagedKV
    from lmcache_connector.tiers.memory.pool import MemoryPool

    cuda = device == "cuda"
    cfg = dict(SEVEN_B, layers=4) if quick else SEVEN_B
    tokens = 8 * CHUNK_TOKENS if quick else STALL_PROMPT_TOKENS
    chunks = tokens // CHUNK_TOKENS
    flat, views = make_layer_views("LBNHC", blocks=chunks * CHUNK_BLOCKS, device=device, **cfg)
    flat.random_(0, 256)
    paged = PagedKV.from_layer_views(views)
    shape = paged.chunk_shape(CHUNK_BLOCKS)
    chunk_bytes = shape[0] * shape[1] * shape[2]
    pool = MemoryPool(chunks, shape)
    ids = [list(range(i * CHUNK_BLOCKS, (i + 1) * CHUNK_BLOCKS)) for i in range(chunks)]
    gather_buffers = [torch.empty(shape, dtype=torch.uint8, device=device) for _ in range(DEFAULT_STORE_BUFFERS)]
    device_api = None if cuda else _dry_run_device_api()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    new_timer = (lambda: torch.cuda.Event(enable_timing=True)) if cuda else _WallEvent
    reps = 1 if quick else 3
    meta = run.results["meta"]
    meta["store_stall"] = info = {"prompt_tokens": tokens, "chunks": chunks, "chunk_bytes": chunk_bytes}
    info["pool_pinned"] = pool.pinned
    sleep = {"cycles": 0, "ms": 0.0}

    def measure(issue: Callable[[], None], then: Callable[[], object] = lambda: None) -> tuple[float, float]:
        """(compute-stream ms of ``issue()``, host ms to queue it)."""
        sync()
        if cuda and sleep["cycles"]:
            torch.cuda._sleep(sleep["cycles"])
        start, end = new_timer(), new_timer()
        start.record()
        started = time.perf_counter()
        issue()
        host_ms = (time.perf_counter() - started) * 1e3
        end.record()
        then()
        end.synchronize()
        sync()
        return start.elapsed_time(end), host_ms

    def gathers() -> None:
        for i in range(chunks):
            ops.gather_blocks(paged, ids[i], gather_buffers[i % len(gather_buffers)])

    def d2h() -> None:
        for i in range(chunks):
            pool.slot(i).copy_(gather_buffers[i % len(gather_buffers)], non_blocking=True)

    def stores(mover: CudaBlockMover, prepare: bool) -> Callable[[], None]:
        def issue() -> None:
            if prepare:
                mover.prepare_stores(chunks, chunk_bytes)
            for i in range(chunks):
                mover.store(ids[i], pool.slot(i), store_id=i, slot=i)

        return issue

    step_bytes = chunks * chunk_bytes
    variants = [
        (f"no prepare_stores (ring of {DEFAULT_STORE_BUFFERS})", False, DEFAULT_MAX_STAGING_BYTES),
        (f"prepare_stores, cap {DEFAULT_MAX_STAGING_BYTES >> 20} MiB (default)", True, DEFAULT_MAX_STAGING_BYTES),
        (f"prepare_stores, cap {step_bytes >> 20} MiB (the step)", True, step_bytes),
    ]
    movers = {label: CudaBlockMover(paged, max_staging_bytes=cap, device_api=device_api) for label, _, cap in variants}
    # Two warm-up passes: the first compiles and grows the rings, the second times the host's
    # queueing of each variant, which the sleep kernel must outlast.
    for _ in range(2):
        host_ms = [measure(gathers)[1]]
        for label, prepare, _ in variants:
            host_ms.append(measure(stores(movers[label], prepare), movers[label].wait_stores)[1])
    if cuda:
        calibrate_cycles = 10_000_000
        ms_per_cycle = measure(lambda: torch.cuda._sleep(calibrate_cycles))[0] / calibrate_cycles
        sleep["ms"] = 2 * max(host_ms) + 5
        sleep["cycles"] = int(sleep["ms"] / ms_per_cycle)
    info["sleep_ms"] = round(sleep["ms"], 2)

    def best_of(issue, then=lambda: None) -> tuple[float, float]:
        samples = [measure(issue, then) for _ in range(reps)]
        return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)

    gathers_ms, gathers_host_ms = best_of(gathers)
    d2h_ms, _ = best_of(d2h)
    common = dict(kind="stall", prompt_tokens=tokens, chunks=chunks, chunk_bytes=chunk_bytes, summary=False)
    run.timing(
        name="store stall: gathers alone (the ceiling)",
        compute_ms=round(gathers_ms, 3),
        us_per_chunk=round(gathers_ms / chunks * 1e3, 1),
        host_issue_ms=round(gathers_host_ms, 2),
        **common,
    )
    run.timing(name="store stall: pinned D2H copy_ of a chunk", us_per_chunk=round(d2h_ms / chunks * 1e3, 1), **common)
    info["gathers_us_per_chunk"] = round(gathers_ms / chunks * 1e3, 1)
    info["d2h_us_per_chunk"] = round(d2h_ms / chunks * 1e3, 1)
    for label, prepare, cap in variants:
        if run.left() < 15:
            run.results["skipped"].append(f"store stall: {label}: time budget")
            continue
        mover = movers.pop(label)
        ms, issue_ms = best_of(stores(mover, prepare), mover.wait_stores)
        buffers, staging_bytes = mover.store_staging
        ratio = round(ms / gathers_ms, 3)
        fits = cuda and prepare and cap >= step_bytes  # dry-run figures are no device times
        run.timing(
            name=f"store stall: {label}",
            compute_ms=round(ms, 3),
            gathers_ms=round(gathers_ms, 3),
            stall_us_per_chunk=round((ms - gathers_ms) / chunks * 1e3, 1),
            ratio_vs_gathers=ratio,
            target=TARGET_STALL_RATIO if fits else None,
            meets=ratio <= TARGET_STALL_RATIO if fits else None,
            prepared=prepare,
            max_staging_bytes=cap,
            staging_buffers=buffers,
            staging_bytes=staging_bytes,
            host_issue_ms=round(issue_ms, 2),
            host_bound=cuda and issue_ms > sleep["ms"],
            **common,
        )
        info[label] = {"stall_us_per_chunk": round((ms - gathers_ms) / chunks * 1e3, 1), "ratio_vs_gathers": ratio}
        del mover
        if cuda:
            torch.cuda.empty_cache()
    pool.close()


# ---------------------------------------------------------------------------- main


def default_path() -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_check.json"
    return ROOT / "benchmarks" / "results" / "gpu_check.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", type=Path, default=None, help="result JSON path")
    parser.add_argument("--budget-s", type=float, default=300, help="overall time budget (seconds)")
    parser.add_argument(
        "--device", default="cuda", choices=("cuda", "cpu"), help="cpu: dry run under TRITON_INTERPRET=1"
    )
    parser.add_argument("--quick", action="store_true", help="small timing sizes (dry runs)")
    args = parser.parse_args()
    device = args.device
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    run = Run(args.out or default_path(), args.budget_s)
    meta = run.results["meta"]
    meta.update(python=platform.python_version(), torch=torch.__version__, argv=sys.argv[1:])

    # The watchdog: past the budget (plus grace), write what there is, print the table and leave.
    def watchdog() -> None:
        run.results["errors"].append({"section": "watchdog", "error": "time budget exceeded; run aborted"})
        try:
            run.save()
            print(run.summary(), flush=True)
        finally:
            os._exit(3)

    timer = threading.Timer(args.budget_s + 60, watchdog)
    timer.daemon = True
    timer.start()

    def setup() -> None:
        import triton

        meta["triton"] = triton.__version__
        sys.modules.setdefault("vllm", None)  # the path under test must not need vLLM
        import lmcache_connector.ops
        import lmcache_connector.ops.cuda_mover  # noqa: F401
        import lmcache_connector.ops.mover  # noqa: F401
        import lmcache_connector.tiers.memory.pool  # noqa: F401

        meta["heavy_imports"] = sorted(m for m in ("yaml", "safetensors", "xxhash") if sys.modules.get(m))
        meta["triton_kernels_import"] = run.check("import lmcache_connector.ops.triton_kernels", _import_kernels)
        if device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("torch.cuda.is_available() is False")
            props = torch.cuda.get_device_properties(0)
            meta.update(
                device=props.name,
                sm_count=props.multi_processor_count,
                l2_bytes=getattr(props, "L2_cache_size", None),
                memory_gib=round(props.total_memory / 2**30, 1),
                cuda=torch.version.cuda,
            )
            torch.ones(1, device="cuda").sum().item()  # context creation out of later timings
        else:
            meta["device"] = "cpu (TRITON_INTERPRET dry run)"

    run.section("setup", 0, setup)
    if run.results["errors"]:
        print(run.summary(), flush=True)
        return 2

    def correctness() -> None:
        rng = random.Random(0)
        blocks = 24
        for name, kw in correctness_cases():
            if run.left() < 150:  # keep time for the timings
                run.results["skipped"].append(f"layout check {name}: time budget")
                continue
            run.check(f"layout {name}", lambda kw=kw: check_layout_case(kw, device, blocks, rng))
        run.check("narrow alignments (8/4/2/1-byte words, masked tiles)", lambda: check_narrow_units(device))
        run.check(
            "memory pool: exactly its size, registered (pinned) on CUDA, copies",
            lambda: check_pool_pinning(run, device, args.quick),
        )
        if device == "cuda":
            run.check("kernel <-> pinned host memory (zero-copy)", lambda: check_pinned_direct(device))
            run.check("CudaBlockMover store/poll/load round trip", lambda: check_mover(device))

    run.section("correctness", 60, correctness)
    run.section("store stall, 32k-token prompt", 30, lambda: time_store_stall(run, device, args.quick))
    if device == "cuda":
        torch.cuda.empty_cache()
    run.section("device timings", 60, lambda: time_device_copies(run, device, args.quick))
    if device == "cuda":
        run.section("host<->device timings", 30, lambda: time_host_copies(run, device, args.quick))
        torch.cuda.empty_cache()
    timer.cancel()
    run.save()
    print(run.summary(), flush=True)
    failed = [c for c in run.results["checks"] if not c["ok"]]
    return 1 if failed or run.results["errors"] else 0


def _import_kernels() -> None:
    import lmcache_connector.ops.triton_kernels  # noqa: F401


if __name__ == "__main__":
    sys.exit(main())
