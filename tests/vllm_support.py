"""Helpers for tests that run real vLLM engines: start one on a locally built model, compare outputs."""

from __future__ import annotations

import os
from pathlib import Path

from lmcache_connector.testing.tiny_model import ModelShape, build_model
from lmcache_connector.testing.vllm_process import CONNECTOR, EngineProcess

REPO = Path(__file__).resolve().parent.parent
MODEL_ROOT = Path(os.environ.get("LMCACHE_TEST_MODEL_DIR", REPO / ".cache" / "models"))


def engine_env(tmp: Path, **extra: str) -> dict[str, str]:
    return {
        "VLLM_CACHE_ROOT": str(tmp / "vllm-cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor"),
        "TRITON_CACHE_DIR": str(tmp / "triton"),
        **extra,
    }


def start_engine(
    shape: ModelShape,
    tmp: Path,
    *,
    connector: bool = True,
    extra_config: dict | None = None,
    env: dict[str, str] | None = None,
    cpus: set[int] | None = None,
    **llm_kwargs,
) -> EngineProcess:
    """A real vLLM engine (CPU build) on a locally built model; prefix caching off unless asked.
    ``cpus``: bind it to those cores (engines that run side by side get one each)."""
    kwargs = {
        "model": str(build_model(shape, MODEL_ROOT)),
        "dtype": shape.torch_dtype,
        "max_model_len": 4096,
        "block_size": 32,
        "enable_prefix_caching": False,
        "seed": 0,
        **llm_kwargs,
    }
    if connector:
        kwargs["kv_transfer_config"] = {**CONNECTOR, "kv_connector_extra_config": extra_config or {}}
    return EngineProcess(kwargs, engine_env(tmp, **(env or {})), cpus=cpus)


def assert_same_greedy(expected: dict, actual: dict, tolerance: float = 0.05) -> None:
    """Greedy outputs must match; a first difference is allowed only at an exact near-tie.

    Reused KV changes the order of floating-point sums, so in bf16 two tokens whose logprobs are
    within a rounding step can swap. That is accepted only when both tokens are within
    ``tolerance`` nats of the best token in both runs (they need ``logprobs``); after such a
    point the sequences legitimately diverge and are not compared further.
    """
    a, b = expected["token_ids"], actual["token_ids"]
    for pos, (ta, tb) in enumerate(zip(a, b, strict=False)):
        if ta == tb:
            continue
        assert expected["logprobs"] and actual["logprobs"], f"outputs differ at position {pos}: {a} vs {b}"
        for run in (expected["logprobs"][pos], actual["logprobs"][pos]):
            best = max(run.values())
            near = {tok for tok, lp in run.items() if lp >= best - tolerance}
            assert ta in near and tb in near, f"outputs differ at position {pos} beyond a near-tie: {a} vs {b}"
        return
    assert len(a) == len(b)


def library_bytes(folder) -> int:
    """This library's files in a cache folder, in bytes (a file renamed or removed meanwhile is skipped)."""
    total = 0
    for entry in os.scandir(folder):
        if ".lmc." in entry.name:
            try:
                total += entry.stat().st_size
            except FileNotFoundError:
                pass
    return total
