"""The CPU path of the block copies (torch), on the per-layer views real vLLM hands the connector.

Every layout vLLM can allocate, every KV dtype, MLA; unsorted, contiguous and mixed block ids;
partial-chunk slot views; bad ids rejected before a byte is written. The expected result is
always computed through vLLM's own per-layer views, never through PagedKV's offsets.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch

from lmcache_connector.ops import PagedKV, gather_blocks, scatter_blocks
from lmcache_connector.ops.reference import gather_blocks_torch, scatter_blocks_torch, word_dtype

kv_iface = pytest.importorskip("vllm.v1.kv_cache_interface")
from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402

LAYERS, BLOCKS = 3, 24
SPECS = {
    "bf16": kv_iface.FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=16, dtype=torch.bfloat16),
    "fp16": kv_iface.FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=16, dtype=torch.float16),
    "fp32": kv_iface.FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=16, dtype=torch.float32),
    "fp8": kv_iface.FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=16, dtype=torch.float8_e4m3fn),
    "mla-bf16": kv_iface.MLAAttentionSpec(block_size=16, num_kv_heads=1, head_size=576, dtype=torch.bfloat16),
}
CASES = [(layout, spec) for layout in KVCacheLayout for spec in SPECS]
CASE_IDS = [f"{layout.name}-{spec}" for layout, spec in CASES]


def vllm_views(layout: KVCacheLayout, spec, raw: torch.Tensor | None = None):
    """A flat int8 backing buffer (random bytes) and vLLM's per-layer views over it."""
    per_block = spec.page_size_bytes * LAYERS
    fixed = (None, per_block if layout.is_block_outermost else None, None, None, None)
    layer_stride, block_stride, *_ = kv_iface.compute_layout_strides(spec, BLOCKS, LAYERS, layout, fixed_strides=fixed)
    tensor = kv_iface.KVCacheTensor(
        size=per_block * BLOCKS,
        layers=[f"layer{i}" for i in range(LAYERS)],
        layer_stride=layer_stride,
        block_stride=block_stride,
    )
    if raw is None:
        raw = torch.randint(-128, 128, (per_block * BLOCKS,), dtype=torch.int8)
    views = kv_iface.create_kv_cache_views(raw, spec, BLOCKS, layout, tensor)
    return raw, dict(zip(tensor.layers, views, strict=True))


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def id_patterns(rng: random.Random) -> dict[str, list[int]]:
    return {
        "unsorted": rng.sample(range(BLOCKS), 7),
        "contiguous": list(range(5, 12)),
        "two-runs": [3, 4, 5, 17, 18, 19],
    }


@pytest.mark.parametrize(("layout", "spec"), CASES, ids=CASE_IDS)
def test_blocks_move_between_layer_views_bit_exactly(layout, spec):
    """gather(src) then scatter(dst) copies every layer's block src[i] to dst[i] and nothing else."""
    rng = random.Random(f"{layout.name}{spec}")
    for pattern, src in id_patterns(rng).items():
        raw, views = vllm_views(layout, SPECS[spec])
        paged = PagedKV.from_layer_views(views)
        dst = rng.sample(range(BLOCKS), len(src))
        chunk = torch.full(paged.chunk_shape(len(src)), 0xA5, dtype=torch.uint8)
        gather_blocks(paged, src, chunk)

        target_raw, target_views = vllm_views(layout, SPECS[spec])
        expected_raw, expected_views = vllm_views(layout, SPECS[spec], raw=target_raw.clone())
        for name, view in views.items():
            expected_views[name][dst] = view[src]
        scatter_blocks(chunk, PagedKV.from_layer_views(target_views), dst)
        assert torch.equal(target_raw, expected_raw), f"{pattern} ids {src} -> {dst}"


@pytest.mark.parametrize(("layout", "spec"), CASES, ids=CASE_IDS)
def test_partial_chunk_slot_views_round_trip(layout, spec):
    """A partial chunk lives in blocks [first, first + n) of a slot: only those bytes are touched."""
    raw, views = vllm_views(layout, SPECS[spec])
    paged = PagedKV.from_layer_views(views)
    slot = torch.full((paged.num_regions, 8, paged.row_bytes), 0xA5, dtype=torch.uint8)
    ids = [20, 2, 9]
    view = slot[:, 4:7]
    assert view.stride(0) > 3 * paged.row_bytes
    gather_blocks(paged, ids, view)
    assert (slot[:, :4] == 0xA5).all() and (slot[:, 7:] == 0xA5).all()

    before = {name: as_bytes(v[ids]) for name, v in views.items()}
    for v in views.values():
        v[ids] = 0
    scatter_blocks(view, paged, ids)
    for name, v in views.items():
        assert torch.equal(as_bytes(v[ids]), before[name]), name


def test_out_of_range_block_id_raises_and_writes_nothing():
    raw, views = vllm_views(KVCacheLayout.LBNHC, SPECS["bf16"])
    paged = PagedKV.from_layer_views(views)
    out = torch.full(paged.chunk_shape(3), 0xA5, dtype=torch.uint8)
    for bad in ([1, BLOCKS, 2], [-1, 3, 4]):
        with pytest.raises(IndexError, match="outside the paged KV cache"):
            gather_blocks(paged, bad, out)
        assert (out == 0xA5).all()
        before = raw.clone()
        with pytest.raises(IndexError):
            scatter_blocks(out, paged, bad)
        assert torch.equal(raw, before)
    before = raw.clone()
    with pytest.raises(ValueError, match="distinct"):
        scatter_blocks(out, paged, [3, 5, 3])
    assert torch.equal(raw, before)


@pytest.mark.parametrize("row_bytes", [15, 6, 12, 40])
def test_narrow_rows_use_narrower_words_and_stay_exact(row_bytes):
    """Rows whose length is not a multiple of 8 are copied through 4/2/1-byte words."""
    stride = row_bytes * 2
    storage = torch.randint(0, 256, (2 * BLOCKS * stride,), dtype=torch.uint8)
    paged = PagedKV(storage, [0, BLOCKS * stride], stride, row_bytes, BLOCKS)
    ids = [9, 2, 5, 0, 7, 13]
    expected = torch.stack(
        [torch.stack([storage[o + b * stride : o + b * stride + row_bytes] for b in ids]) for o in paged.region_offsets]
    )
    out = torch.full(paged.chunk_shape(len(ids)), 0xA5, dtype=torch.uint8)
    gather_blocks_torch(paged, ids, out)
    assert torch.equal(out, expected)
    assert word_dtype(paged, out).itemsize == {15: 1, 6: 2, 12: 4, 40: 8}[row_bytes]

    chunk = torch.randint(0, 256, out.shape, dtype=torch.uint8)
    before = storage.clone()
    scatter_blocks_torch(chunk, paged, ids)
    for r, offset in enumerate(paged.region_offsets):
        for i, b in enumerate(ids):
            before[offset + b * stride : offset + b * stride + row_bytes] = chunk[r, i]
    assert torch.equal(storage, before)


@pytest.mark.parametrize("layout", list(KVCacheLayout), ids=lambda layout: layout.name)
def test_gpu_check_builds_the_views_vllm_builds(layout):
    """benchmarks/gpu_check.py runs without vLLM; its stand-in views must be vLLM's exactly."""
    spec_path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    module_spec = importlib.util.spec_from_file_location("gpu_check", spec_path)
    gpu_check = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(gpu_check)
    for spec in SPECS.values():
        _, ours = gpu_check.make_layer_views(
            layout.name,
            LAYERS,
            BLOCKS,
            spec.num_kv_heads,
            spec.block_size,
            spec.head_size * (1 if "MLA" in type(spec).__name__ else 2),
            spec.dtype,
        )
        _, theirs = vllm_views(layout, spec)
        for (name, a), b in zip(ours.items(), theirs.values(), strict=True):
            assert (a.shape, a.stride(), a.storage_offset(), a.dtype) == (
                b.shape,
                b.stride(),
                b.storage_offset(),
                b.dtype,
            ), name
