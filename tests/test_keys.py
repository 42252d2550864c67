"""Chunk keys: deterministic across processes, and different whenever the KV bytes would differ."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

from lmcache_connector.keys import MultimodalItem, Namespace, block_fingerprints, rank_tag, request_root, storage_name

NS = Namespace(
    model="m", kv_dtype="bfloat16", kv_layout="LBHNC", page_bytes=4096, num_layers=2, block_size=16, chunk_size=64
)
TOKENS = list(range(100, 100 + 16 * 6 + 5))


def fps(ns=NS, tokens=TOKENS, **root):
    return block_fingerprints(request_root(ns.digest(), **root), tokens, ns.block_size)


def test_one_fingerprint_per_whole_block():
    assert len(fps()) == 6


def test_a_fingerprint_covers_the_whole_prefix():
    changed = list(TOKENS)
    changed[20] += 1  # inside block 1
    a, b = fps(), fps(tokens=changed)
    assert a[0] == b[0]
    assert all(x != y for x, y in zip(a[1:], b[1:], strict=True))


def test_everything_that_changes_kv_changes_the_keys():
    base = fps()[0]
    for field, value in [
        ("model", "other"),
        ("checkpoint", "revision=;files:0123"),
        ("quantization", "fp8"),
        ("model_dtype", "float16"),
        ("kv_dtype", "float16"),
        ("kv_dtype", "fp8_e5m2"),
        ("kv_layout", "LBNHC"),
        ("page_bytes", 8192),
        ("num_layers", 3),
        ("chunk_size", 128),
        ("tp_size", 2),
        ("pp_size", 2),
    ]:
        assert fps(ns=dataclasses.replace(NS, **{field: value}))[0] != base, field
    assert fps(lora="adapter")[0] != base
    assert fps(cache_salt="tenant-a")[0] != base
    assert fps(cache_salt="tenant-a")[0] != fps(cache_salt="tenant-b")[0]


def test_one_storage_name_per_rank_copy_of_a_chunk():
    key = fps()[-1].hex()
    other = dataclasses.replace(NS, model="another").digest().hex()
    ns = NS.digest().hex()
    names = {storage_name(ns, rank_tag(tp), key) for tp in range(2)} | {storage_name(other, rank_tag(0), key)}
    assert len(names) == 3  # ranks and namespaces never share a name
    assert all(re.fullmatch(r"[0-9a-f]{16}-tp\dpp0-[0-9a-f]{32}", n) for n in names)


def test_multimodal_items_change_only_the_blocks_they_overlap():
    root = request_root(NS.digest())
    plain = block_fingerprints(root, TOKENS, 16)
    image = block_fingerprints(root, TOKENS, 16, [MultimodalItem("img-abc", offset=40, length=10)])
    other = block_fingerprints(root, TOKENS, 16, [MultimodalItem("img-xyz", offset=40, length=10)])
    assert plain[:2] == image[:2]  # blocks 0 and 1 end before the image
    assert image[2] != plain[2] and image[2] != other[2]


def test_keys_do_not_depend_on_python_hash_seed():
    script = (
        "from lmcache_connector.keys import Namespace, block_fingerprints, request_root;"
        "ns = Namespace('m', 'bfloat16', 'LBHNC', 4096, 2, 16, 64);"
        "print(block_fingerprints(request_root(ns.digest()), list(range(100, 200)), 16)[-1].hex())"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("0", "1", "random")
    }
    assert len(outputs) == 1
    assert outputs == {fps(tokens=list(range(100, 200)))[-1].hex()}
