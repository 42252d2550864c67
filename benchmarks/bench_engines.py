"""The engines the benchmarks compare, on the bench model, each in its own process.

``kind`` is ``lmcache_connector``, ``vllm-prefix-cache`` (vLLM's own prefix caching, no connector),
``ExampleConnector`` (vLLM's file-per-layer reference connector) or ``none`` (neither).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lmcache_connector.testing.tiny_model import BENCH, build_model  # noqa: E402
from lmcache_connector.testing.vllm_process import CONNECTOR, EngineProcess  # noqa: E402


def bench_engine(
    kind: str,
    tmp: str,
    *,
    capped_blocks: int | None = None,
    disk_folder: str | None = None,
    example_folder: str | None = None,
    env: dict[str, str] | None = None,
    cpus: set[int] | None = None,
) -> EngineProcess:
    """Start one engine; ``capped_blocks`` caps vLLM's KV cache, ``disk_folder`` enables our disk tier,
    ``env`` adds (or overrides) environment variables of the engine process (e.g. ``LMCACHE_*``),
    ``cpus`` binds the engine to those cores (engines side by side, one core each)."""
    kwargs = {
        "model": str(build_model(BENCH, REPO / ".cache" / "models")),
        "dtype": "bfloat16",
        "block_size": 32,
        "max_model_len": 8192,
        "enable_prefix_caching": kind == "vllm-prefix-cache",
    }
    if capped_blocks:
        kwargs["num_gpu_blocks_override"] = capped_blocks
        kwargs["max_model_len"] = (capped_blocks - 2) * 32
    child_env = {"VLLM_CACHE_ROOT": f"{tmp}/vllm", "TMPDIR": tmp, "VLLM_LOGGING_LEVEL": "WARNING"}
    if kind == "lmcache_connector":
        kwargs["kv_transfer_config"] = {**CONNECTOR, "kv_connector_extra_config": {"chunk_size": 256}}
        if disk_folder:
            child_env.update(LMCACHE_LOCAL_DISK=disk_folder, LMCACHE_MAX_LOCAL_DISK_SIZE="4")
    elif kind == "ExampleConnector":
        folder = example_folder or f"{tmp}/example-{time.monotonic_ns()}"
        kwargs["kv_transfer_config"] = {
            "kv_connector": "ExampleConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"shared_storage_path": folder},
        }
    return EngineProcess(kwargs, {**child_env, **(env or {})}, cpus=cpus)
