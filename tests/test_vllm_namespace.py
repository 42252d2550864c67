"""On real engines sharing one warm disk folder: KV stored by other weights or in another KV format
is never loaded, and outputs stay those of a cold run."""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

import pytest
from vllm_support import MODEL_ROOT, assert_same_greedy, start_engine

from lmcache_connector.testing.tiny_model import TINY, ModelShape, build_model, random_prompt

pytestmark = pytest.mark.engine

CHUNK = {"chunk_size": 128}
PROMPT = random_prompt(300, seed=41)  # 9 whole blocks of 32 tokens: 288 tokens a hit would supply
HIT_TOKENS = 288


def disk_env(folder: Path) -> dict[str, str]:
    return {"LMCACHE_LOCAL_DISK": str(folder), "LMCACHE_MAX_LOCAL_DISK_SIZE": "0.1"}


def namespaces_on_disk(folder: Path) -> set[str]:
    """The namespaces of the chunk files in the folder (the first 16 hex digits of their names)."""
    return {p.name[:16] for p in folder.iterdir() if p.name.endswith(".lmc.safetensors")}


def run_once(shape_or_folder, tmp: Path, **kwargs) -> dict:
    shape = TINY
    if isinstance(shape_or_folder, Path):
        kwargs["model"] = str(shape_or_folder)
    with start_engine(shape, tmp, **kwargs) as engine:
        return engine.generate([PROMPT], max_tokens=10, logprobs=5)[0]


def _cpu_runs_fp8_kv() -> bool:
    """vLLM's CPU attention supports fp8 KV only on x86 with AVX-512 or AMX (and head sizes % 32 == 0)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512f", "amx_tile"})


@pytest.mark.skipif(not _cpu_runs_fp8_kv(), reason="fp8 KV on vLLM's CPU build needs x86 with AVX-512 or AMX")
def test_kv_stored_as_fp8_e4m3_is_not_loaded_by_an_fp8_e5m2_engine(engine_tmp, tmp_path):
    disk = tmp_path / "disk"
    stored = run_once(TINY, engine_tmp, env=disk_env(disk), extra_config=CHUNK, kv_cache_dtype="fp8_e4m3")
    assert stored["num_cached_tokens"] == 0
    e4m3_files = namespaces_on_disk(disk)
    assert len(e4m3_files) == 1  # the folder is warm for e4m3

    e5m2 = run_once(TINY, engine_tmp, env=disk_env(disk), extra_config=CHUNK, kv_cache_dtype="fp8_e5m2")
    baseline = run_once(TINY, engine_tmp, connector=False, kv_cache_dtype="fp8_e5m2")
    assert e5m2["num_cached_tokens"] == 0
    assert_same_greedy(baseline, e5m2)
    assert len(namespaces_on_disk(disk) - e4m3_files) == 1  # e5m2 stored under a namespace of its own


def test_another_checkpoint_never_loads_kv_of_the_old_one_by_name_or_by_path(engine_tmp, tmp_path):
    """(1) A second checkpoint served under the same served_model_name, and (2) that checkpoint
    copied over the first one's files at the same path: neither gets the first one's KV."""
    disk = tmp_path / "disk"
    first = shutil.copytree(build_model(TINY, MODEL_ROOT), tmp_path / "served-model")  # overwritten below
    second = build_model(ModelShape(seed=7), tmp_path / "models")
    served = {"served_model_name": "default", "env": disk_env(disk), "extra_config": CHUNK}

    stored = run_once(first, engine_tmp, **served)
    assert stored["num_cached_tokens"] == 0
    first_namespaces = namespaces_on_disk(disk)

    other = run_once(second, engine_tmp, **served)
    assert other["num_cached_tokens"] == 0  # same alias, other weights: a miss
    assert other["token_ids"] != stored["token_ids"]  # (they are other weights)

    for weights in second.glob("*.safetensors"):
        shutil.copyfile(weights, first / weights.name)  # an upgrade written in place
    upgraded = run_once(first, engine_tmp, **served)
    assert upgraded["num_cached_tokens"] == 0
    # A cold run of the second checkpoint: `other` loaded nothing, so it is exactly that.
    assert_same_greedy(other, upgraded)
    assert len(namespaces_on_disk(disk)) == len(first_namespaces) + 2
