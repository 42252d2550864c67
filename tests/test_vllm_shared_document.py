"""The shared-document workload on a real engine, with every tier under pressure.

Several questions about one document arrive together, for several documents, with a memory tier
smaller than the working set and the disk tier on, and ``LMCACHE_LOAD_FAILURE_POLICY=fail`` (so a
load the connector promised and could not deliver would fail a request instead of being quietly
recomputed). vLLM's own prefix cache is on but small, so it evicts documents and the connector has
to supply them; a revisited document has its first chunks only on disk and its later ones in memory.
"""

from __future__ import annotations

import os
import time

import pytest
from vllm_support import start_engine

from lmcache_connector.testing.tiny_model import TINY, random_prompt

CHUNK = 128  # 4 blocks of 32 tokens: 128 KiB of float32 KV per chunk for this model
CHUNK_BYTES = 128 * 1024
SETTINGS = {
    "dtype": "float32",  # exact greedy equality with the baseline
    "enable_prefix_caching": True,
    "num_gpu_blocks_override": 96,  # 3,072 tokens of vLLM cache: it cannot hold the documents
    "max_model_len": 2048,
}
DOC_TOKENS = 1024  # 8 chunks per document
QUESTIONS = 3


@pytest.fixture(scope="module")
def engines(engine_tmp, tmp_path_factory):
    folder = tmp_path_factory.mktemp("shared-doc-disk")
    env = {
        "LMCACHE_LOCAL_DISK": str(folder),
        "LMCACHE_MAX_LOCAL_DISK_SIZE": "0.1",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": str(12 * CHUNK_BYTES / 2**30),  # 12 chunks: less than 2 documents
        "LMCACHE_LOAD_FAILURE_POLICY": "fail",
    }
    engine = start_engine(TINY, engine_tmp, env=env, extra_config={"chunk_size": CHUNK}, **SETTINGS)
    baseline = start_engine(TINY, engine_tmp, connector=False, **SETTINGS)
    yield engine, baseline, folder
    engine.close()
    baseline.close()


def _round(doc_seed: int) -> list[list[int]]:
    document = random_prompt(DOC_TOKENS, seed=doc_seed)
    return [document + random_prompt(24 + q, seed=doc_seed * 100 + q) for q in range(QUESTIONS)]


def _check(engine, baseline, prompts, max_tokens=6):
    outputs = engine.generate(prompts, max_tokens=max_tokens)
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out["finish_reason"] == "length", f"a request failed: {out}"
        assert out["token_ids"] == baseline.generate([prompt], max_tokens=max_tokens)[0]["token_ids"]
    return outputs


def test_questions_on_shared_documents_never_fail_and_revisits_hit(engines):
    engine, baseline, _ = engines
    for doc in range(4):  # 32 chunks of documents through a 12-chunk memory tier
        _check(engine, baseline, _round(doc))
    for doc in (0, 2):  # long evicted from vLLM's cache and partly from memory: disk and memory serve them
        # Chunks whose disk write is still unreported stay pinned, and the tier never promises what
        # it cannot stage; once the writes are reported, the whole document can be staged.
        engine.call("connector_state")
        outputs = _check(engine, baseline, _round(doc))
        assert outputs[0]["num_cached_tokens"] >= DOC_TOKENS
    state = engine.call("connector_state")
    assert state["totals"]["hit_tokens_by_tier"]["disk"] > 0
    assert (state["pins"], state["inflight"], state["tracked_requests"]) == (0, 0, 0)
    assert state["stored_bytes"] == state["recounted_bytes"]


def test_a_connector_reset_forgets_every_chunk(engines):
    engine, baseline, folder = engines
    prompts = _round(7)
    _check(engine, baseline, prompts)
    assert engine.call("reset_prefix_cache", reset_connector=True)
    after = _check(engine, baseline, prompts[:1])
    assert after[0]["num_cached_tokens"] == 0  # neither vLLM's cache nor any tier of ours
    engine.call("connector_state")  # settles the disk writes of the request just served
    # Every file from before the reset is deleted (in the background); only that request's chunks remain.
    deadline = time.monotonic() + 10
    while len(_chunk_files(folder)) > DOC_TOKENS // CHUNK + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(_chunk_files(folder)) <= DOC_TOKENS // CHUNK + 1


def _chunk_files(folder) -> list[str]:
    return [name for name in os.listdir(folder) if name.endswith(".lmc.safetensors")]
