"""The Triton block-copy kernels, run by Triton's interpreter on CPU tensors, against the torch reference.

``TRITON_INTERPRET=1`` is read when a kernel is decorated, so the kernel module is imported afresh
with it set (and the previous module put back afterwards): other tests in this process, and vLLM,
keep the compiled-kernel behaviour. The interpreter costs milliseconds per program instance, so
shapes are small; each still has several regions, odd block counts and non-power-of-two rows.

The views come from benchmarks/gpu_check.py's vLLM-free builder (tests/test_ops_torch.py checks
it against vLLM's own), so the GPU check and these tests exercise the same layouts.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import random
import sys
from pathlib import Path

import pytest
import torch

from lmcache_connector.ops import PagedKV
from lmcache_connector.ops.reference import gather_blocks_torch, scatter_blocks_torch

KERNELS = "lmcache_connector.ops.triton_kernels"
ROOT = Path(__file__).resolve().parents[1]
BLOCKS = 24


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load_gpu_check()


@pytest.fixture(scope="module")
def kernels():
    """lmcache_connector.ops.triton_kernels with its kernel in interpreter mode.

    The variable stays set while this module's tests run: the interpreter imports parts of
    Triton lazily on first launch, and they check it too.
    """
    previous_module = sys.modules.pop(KERNELS, None)
    previous_env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        module = importlib.import_module(KERNELS)
        assert type(module._copy_blocks_kernel).__name__ == "InterpretedFunction"
        yield module
    finally:
        if previous_env is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous_env
        sys.modules.pop(KERNELS, None)
        if previous_module is not None:
            sys.modules[KERNELS] = previous_module


CASES = {name: kw for name, kw in gpu_check.correctness_cases()}


def build(kw: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor], PagedKV]:
    flat, views = gpu_check.make_layer_views(blocks=BLOCKS, **kw)
    flat.random_(0, 256)
    return flat, views, PagedKV.from_layer_views(views)


def poisoned(shape, value: int) -> torch.Tensor:
    return torch.full(shape, value, dtype=torch.uint8)


@pytest.mark.parametrize("case", list(CASES))
def test_gather_matches_reference_every_layout_and_dtype(kernels, case):
    """Unsorted odd and contiguous ids; outputs poisoned differently so an unwritten byte fails."""
    _, _, paged = build(CASES[case])
    rng = random.Random(case)
    for ids in (rng.sample(range(BLOCKS), 13), list(range(7, 12))):
        out, ref = poisoned(paged.chunk_shape(len(ids)), 0xA5), poisoned(paged.chunk_shape(len(ids)), 0x5A)
        kernels.gather_blocks_triton(paged, ids, out)
        gather_blocks_torch(paged, ids, ref)
        assert torch.equal(out, ref), ids


@pytest.mark.parametrize("case", list(CASES))
def test_scatter_matches_reference_and_writes_nothing_else(kernels, case):
    flat, _, paged = build(CASES[case])
    rng = random.Random(case)
    for ids in (rng.sample(range(BLOCKS), 13), list(range(3, 8))):
        chunk = torch.randint(0, 256, paged.chunk_shape(len(ids)), dtype=torch.uint8)
        before = flat.clone()
        kernels.scatter_blocks_triton(chunk, paged, ids)
        got = flat.clone()
        flat.copy_(before)
        scatter_blocks_torch(chunk, paged, ids)
        assert torch.equal(got, flat), ids
        assert not torch.equal(got, before)


@pytest.mark.parametrize("case", ["LBNHC-bf16", "LHBNC-fp8", "BLHNC-fp32", "BHLNC-MLA-bf16"])
def test_round_trip_through_layer_views_is_bit_exact(kernels, case):
    """Blocks src -> chunk -> blocks dst: every layer's view of dst now holds what src held."""
    _, views, paged = build(CASES[case])
    src, dst = [17, 3, 9, 21, 0], [5, 22, 1, 14, 8]
    expected = {name: v.view(torch.uint8)[src].clone() for name, v in views.items()}
    chunk = poisoned(paged.chunk_shape(len(src)), 0xA5)
    kernels.gather_blocks_triton(paged, src, chunk)
    kernels.scatter_blocks_triton(chunk, paged, dst)
    for name, v in views.items():
        assert torch.equal(v.view(torch.uint8)[dst], expected[name]), name


@pytest.mark.parametrize("first", [0, 3])
def test_partial_chunk_slot_view_touches_only_its_blocks(kernels, first):
    """A ``[R, n, row]`` view into a ``[R, 8, row]`` slot (stride(0) > n * row), at a block offset."""
    flat, _, paged = build(CASES["LBHNC-bf16"])
    slot = poisoned((paged.num_regions, 8, paged.row_bytes), 0xA5)
    ids = [19, 4, 11]
    view = slot[:, first : first + 3]
    assert view.stride(0) > 3 * paged.row_bytes
    kernels.gather_blocks_triton(paged, ids, view)
    ref = poisoned(view.shape, 0x5A)
    gather_blocks_torch(paged, ids, ref)
    assert torch.equal(view, ref)
    outside = torch.cat([slot[:, :first], slot[:, first + 3 :]], dim=1)
    assert (outside == 0xA5).all()

    view.random_(0, 256)
    before = flat.clone()
    kernels.scatter_blocks_triton(view, paged, ids)
    got = flat.clone()
    flat.copy_(before)
    scatter_blocks_torch(view.contiguous(), paged, ids)
    assert torch.equal(got, flat)


@pytest.mark.parametrize("tile_bytes", [96, 1024])
def test_tiles_that_do_not_divide_the_row(kernels, tile_bytes):
    """Several programs per row, the last one masked (MLA rows are 18 KiB; tiles are powers of two)."""
    _, _, paged = build(CASES["LBNHC-MLA-bf16"])
    ids = [23, 0, 12, 5, 18]
    out, ref = poisoned(paged.chunk_shape(5), 0xA5), poisoned(paged.chunk_shape(5), 0x5A)
    kernels.gather_blocks_triton(paged, ids, out, tile_bytes=tile_bytes)
    gather_blocks_torch(paged, ids, ref)
    assert torch.equal(out, ref)


@pytest.mark.parametrize(("row_bytes", "unit"), [(15, 1), (6, 2), (12, 4), (24, 8), (48, 16), (16 * 131 + 16, 16)])
def test_copy_width_follows_alignment_and_stays_exact(kernels, row_bytes, unit):
    """16-byte accesses when everything is 16-byte aligned, narrower words otherwise; same bytes."""
    stride = 2 * row_bytes
    storage = torch.randint(0, 256, (2 * BLOCKS * stride + 7,), dtype=torch.uint8)
    paged = PagedKV(storage, [0, BLOCKS * stride], stride, row_bytes, BLOCKS)
    ids = [9, 2, 5, 0, 7]
    out, ref = poisoned(paged.chunk_shape(5), 0xA5), poisoned(paged.chunk_shape(5), 0x5A)
    assert kernels.copy_unit_bytes(paged, out) == unit
    kernels.gather_blocks_triton(paged, ids, out, tile_bytes=64)
    gather_blocks_torch(paged, ids, ref)
    assert torch.equal(out, ref)

    chunk = torch.randint(0, 256, out.shape, dtype=torch.uint8)
    before = storage.clone()
    kernels.scatter_blocks_triton(chunk, paged, ids, tile_bytes=64)
    got = storage.clone()
    storage.copy_(before)
    scatter_blocks_torch(chunk, paged, ids)
    assert torch.equal(got, storage)


def test_misaligned_chunk_buffer_falls_back_to_bytes(kernels):
    _, _, paged = build(CASES["LBNHC-fp16"])
    backing = poisoned((paged.num_regions * 4 * paged.row_bytes + 1,), 0xA5)
    out = backing[1:].view(paged.chunk_shape(4))
    assert kernels.copy_unit_bytes(paged, out) == 1
    ref = poisoned(out.shape, 0x5A)
    kernels.gather_blocks_triton(paged, [6, 2, 20, 13], out)
    gather_blocks_torch(paged, [6, 2, 20, 13], ref)
    assert torch.equal(out, ref)


def test_aligned_copies_compile_to_16_byte_accesses_for_hopper(monkeypatch):
    """Offline compile for sm_90 (no GPU needed): the aligned kernel's loads and stores are 128-bit."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # A private, compiled-mode copy of the kernel module (the fixture's copy is interpreted).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # silences a Triton 3.9 notice; no floats here
    spec = importlib.util.spec_from_file_location(
        f"{KERNELS}_compiled", ROOT / "lmcache_connector/ops/triton_kernels.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kernel = module._copy_blocks_kernel
    assert type(kernel).__name__ == "JITFunction"
    signature = {
        "paged_ptr": "*i64",
        "region_offsets_ptr": "*i64",
        "block_ids_ptr": "*i32",
        "chunk_ptr": "*i64",
        "first_block": "i32",
        "block_stride": "i32",
        "chunk_region_stride": "i32",
        "row": "i32",
        **dict.fromkeys(["TILE", "ALIGN", "EVEN_TILES", "CONTIGUOUS_IDS", "GATHER"], "constexpr"),
    }
    constants = {"TILE": 2048, "ALIGN": 2, "EVEN_TILES": True, "CONTIGUOUS_IDS": False, "GATHER": True}
    aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 5, 6, 7)}
    compiled = triton.compile(
        ASTSource(kernel, signature, constants, aligned), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}
    )
    ptx = compiled.asm["ptx"]
    assert "ld.global.v2.b64" in ptx and "st.global.v2.b64" in ptx
