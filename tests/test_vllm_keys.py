"""Two separate engine processes compute the same chunk keys for the same model and prompt,
whatever their PYTHONHASHSEED or vLLM's own prefix-hash settings."""

from __future__ import annotations

from vllm_support import start_engine

from lmcache_connector.testing.tiny_model import TINY, random_prompt


def test_two_engine_processes_compute_identical_keys(engine_tmp):
    prompt = random_prompt(500, seed=5)
    first = start_engine(TINY, engine_tmp, env={"PYTHONHASHSEED": "1"})
    try:
        keys_first = first.call("fingerprints", prompt=prompt)
    finally:
        first.close()
    second = start_engine(
        TINY,
        engine_tmp,
        env={"PYTHONHASHSEED": "2"},
        enable_prefix_caching=True,
        prefix_caching_hash_algo="sha256_cbor",
    )
    try:
        keys_second = second.call("fingerprints", prompt=prompt)
    finally:
        second.close()
    assert len(keys_first["fingerprints"]) == 500 // 32
    assert keys_first == keys_second
