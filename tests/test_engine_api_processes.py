"""The engine API across processes, on a float32 tiny Llama built locally (``transformers``, random
weights, no hub): KV one process stored is retrieved by a new process from the disk tier, and by
another from a real Redis, and generation continues exactly as if the prompt had been recomputed.
Also: the API imports and runs in a process where importing vLLM fails.

Each child (``engine_api_child.py``) is a fresh interpreter with its own ``LMCACHE_*`` environment,
as two engines on two machines would be; they share only the disk folder and the Redis server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis_servers as rs
from engine_api_support import tiny_f32_model, tokens

CHILD = Path(__file__).resolve().parent / "engine_api_child.py"
LOGITS_ATOL = 1e-4  # float32, the same kernels: in practice the difference is 0 or a few ulp


def run_child(role: str, model: Path, prompt: dict, settings: dict[str, str]) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
    environ |= settings | {"OMP_NUM_THREADS": "1", "LMCACHE_LOG_LEVEL": "WARNING"}
    proc = subprocess.run(
        [sys.executable, str(CHILD), role, str(model), json.dumps(prompt)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{role} child failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def model() -> Path:
    return tiny_f32_model()


def test_a_new_process_continues_generation_from_the_disk_tier_and_from_redis(model, tmp_path):
    # 600 tokens: two whole chunks of 256, then five whole blocks (a partial chunk) and 8 tokens more.
    prompt = tokens(600, seed=11)
    request = {"prompt": prompt, "longer": prompt[:512] + tokens(300, seed=12), "shared": 512}
    memory = {"LMCACHE_MAX_LOCAL_CPU_SIZE": "0.2"}
    disk = {"LMCACHE_LOCAL_DISK": str(tmp_path / "disk"), "LMCACHE_MAX_LOCAL_DISK_SIZE": "1"}
    with rs.redis_server(tmp_path / "redis") as server:
        remote = {"LMCACHE_REMOTE_URL": f"redis://127.0.0.1:{server.port}"}
        stored = run_child("store", model, request, memory | disk | remote)
        assert stored == {"stored": 592}
        from_disk = run_child("continue", model, request, memory | disk)
        from_redis = run_child("continue", model, request, memory | remote)

    for result, tier in ((from_disk, "disk"), (from_redis, "remote")):
        assert result["available"] == 592, tier  # whole chunks, plus the stored partial chunk's blocks
        assert result["hit"] == 592, tier
        assert result["tokens_from_cache"] == result["tokens_recomputed"], tier
        assert result["logits_max_diff"] <= LOGITS_ATOL, tier
        assert result["longer_hit"] == 512, tier  # exactly the two shared whole chunks
        assert result["longer_kv_max_diff"] <= LOGITS_ATOL, tier
        assert result["miss"], tier
        assert set(result["hit_tokens_by_tier"]) <= {tier, "memory"}, result["hit_tokens_by_tier"]
        assert result["hit_tokens_by_tier"][tier] == 592, tier  # the first retrieve's chunks came from that tier


BLOCK_VLLM = """
import sys

class NoVllm:
    def find_spec(self, name, path=None, target=None):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("vLLM is not installed in this process")

sys.meta_path.insert(0, NoVllm())
try:
    import vllm
except ImportError:
    pass
else:
    raise SystemExit("vllm could still be imported")
"""

USE_THE_API = """
import torch
from lmcache_connector.engine import KVCache

kv = [(torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)) for _ in range(3)]
settings = {"LMCACHE_MAX_LOCAL_CPU_SIZE": "0.01", "LMCACHE_CHUNK_SIZE": "32",
            "LMCACHE_LOCAL_DISK": sys.argv[1], "LMCACHE_MAX_LOCAL_DISK_SIZE": "0.01"}
with KVCache.from_env("m", 3, 2, 8, "float32", env=settings) as cache:
    assert cache.store(list(range(40)), kv) == 32
with KVCache.from_env("m", 3, 2, 8, "float32", env=settings) as cache:
    n, got = cache.retrieve(list(range(40)))
assert n == 32 and all(torch.equal(g, w[:, :, :32]) for pg, pw in zip(got, kv) for g, w in zip(pg, pw))
print(sorted(m for m in ("vllm", "transformers") if m in sys.modules))
"""


def test_the_api_imports_and_runs_where_vllm_cannot_be_imported(tmp_path):
    code = textwrap.dedent(BLOCK_VLLM) + textwrap.dedent(USE_THE_API)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "disk")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"  # neither vLLM nor transformers was needed
