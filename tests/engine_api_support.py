"""Helpers for the engine API's tests: small random KV, environments for its tiers, a float32 tiny Llama.

The KV here is what ``transformers`` hands a caller (``[1, heads, tokens, head_size]`` per layer),
random, so any byte moved to the wrong place shows; chunks are small (``CHUNK`` tokens) so a few
hundred tokens cover whole chunks, a partial chunk and a trailing partial block.
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

import torch

from lmcache_connector.engine import KVCache
from lmcache_connector.testing.tiny_model import TINY, build_model

REPO = Path(__file__).resolve().parent.parent
MODEL_ROOT = Path(os.environ.get("LMCACHE_TEST_MODEL_DIR", REPO / ".cache" / "models"))
TINY_F32 = dataclasses.replace(TINY, torch_dtype="float32")  # logits comparable at float32 tolerance

LAYERS, HEADS, HEAD_SIZE = 2, 2, 8
CHUNK = 64  # four blocks of 16


def env(tmp: Path | None = None, **settings: str) -> dict[str, str]:
    """An ``LMCACHE_*`` environment: a small memory tier and ``CHUNK``-token chunks; ``disk=True``
    adds a disk tier under ``tmp``; any other ``LMCACHE_`` setting by keyword (``save_unfull_chunk="False"``)."""
    values = {"LMCACHE_MAX_LOCAL_CPU_SIZE": "0.02", "LMCACHE_CHUNK_SIZE": str(CHUNK), "LMCACHE_LOG_LEVEL": "WARNING"}
    if settings.pop("disk", None):
        values |= {"LMCACHE_LOCAL_DISK": str(tmp / "disk"), "LMCACHE_MAX_LOCAL_DISK_SIZE": "0.1"}
    values |= {f"LMCACHE_{k.upper()}": v for k, v in settings.items()}
    return values


def random_cache(environ: dict[str, str], model: str = "random-kv-model", **shape) -> KVCache:
    return KVCache.from_env(
        model,
        shape.get("num_layers", LAYERS),
        shape.get("num_kv_heads", HEADS),
        shape.get("head_size", HEAD_SIZE),
        shape.get("dtype", torch.float32),
        env=environ,
        device=shape.get("device", "cpu"),
    )


def random_kv(num_tokens: int, seed: int = 0, dtype=torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        tuple(torch.randn(1, HEADS, num_tokens, HEAD_SIZE, generator=gen).to(dtype) for _ in "KV")
        for _ in range(LAYERS)
    ]


def tokens(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 1000) for _ in range(n)]


def prefix_of(kv, n: int):
    return [(k[:, :, :n], v[:, :, :n]) for k, v in kv]


def same_kv(got, want) -> bool:
    return len(got) == len(want) and all(
        torch.equal(g[i], w[i]) for g, w in zip(got, want, strict=True) for i in range(2)
    )


def tiny_f32_model() -> Path:
    """The folder of a float32 tiny Llama with random weights, built locally once."""
    return build_model(TINY_F32, MODEL_ROOT)
