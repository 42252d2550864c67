"""The disk tier on real vLLM engines and real files: warm across restarts, crash-safe, bounded,
and never a source of wrong KV."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from vllm_support import assert_same_greedy, library_bytes, start_engine

from lmcache_connector.testing.tiny_model import TINY, random_prompt
from lmcache_connector.tiers.disk.format import ChunkFileError, read_chunk_into, read_header

CHUNK = {"chunk_size": 128}  # 4 blocks of 32 tokens: 64 KiB per chunk file for this model
FILE_BYTES = 64 * 1024 + 1024  # a chunk file: its bytes plus a header of under 1 KiB


def disk_env(folder: Path, size_gb: float = 0.1, **extra: str) -> dict[str, str]:
    return {"LMCACHE_LOCAL_DISK": str(folder), "LMCACHE_MAX_LOCAL_DISK_SIZE": str(size_gb), **extra}


def chunk_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(".lmc.safetensors"))


def verifies(path: Path) -> bool:
    try:
        chunk_header, _, _ = read_header(str(path))
        regions = chunk_header.shape[0]
        read_chunk_into(
            str(path), None, [memoryview(bytearray(chunk_header.nbytes // regions)) for _ in range(regions)]
        )
    except ChunkFileError:
        return False
    return True


def one(engine, prompt, max_tokens=10):
    return engine.generate([prompt], max_tokens=max_tokens, logprobs=5)[0]


@pytest.fixture(scope="module")
def baseline(engine_tmp):
    engine = start_engine(TINY, engine_tmp, connector=False)
    yield engine
    engine.close()


def test_a_new_engine_gets_hits_for_what_an_earlier_one_stored(engine_tmp, tmp_path, baseline):
    prompt = random_prompt(700, seed=1)
    with start_engine(TINY, engine_tmp, env=disk_env(tmp_path), extra_config=CHUNK) as first:
        cold = one(first, prompt)
    assert len(chunk_files(tmp_path)) == 6  # 5 full chunks and the partial last one, flushed at exit

    with start_engine(TINY, engine_tmp, env=disk_env(tmp_path), extra_config=CHUNK) as second:
        warm = one(second, prompt)
        state = second.call("connector_state")
    assert warm["num_cached_tokens"] == 672  # every whole block of the 700-token prompt
    assert state["totals"]["hit_tokens_by_tier"]["disk"] == 672
    assert_same_greedy(cold, warm)
    assert_same_greedy(one(baseline, prompt), warm)


def test_an_engine_killed_while_writing_leaves_only_intact_chunks(engine_tmp, tmp_path, baseline):
    prompts = [random_prompt(640, seed=100 + i) for i in range(12)]
    engine = start_engine(TINY, engine_tmp, env=disk_env(tmp_path), extra_config=CHUNK)
    engine.send("generate", prompts=prompts, max_tokens=4, logprobs=None)
    deadline = time.monotonic() + 60
    while not chunk_files(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.005)
    engine.kill()  # SIGKILL, in the middle of writing chunk files
    assert all(verifies(path) for path in chunk_files(tmp_path))  # every file under a chunk's name is whole

    with start_engine(TINY, engine_tmp, env=disk_env(tmp_path), extra_config=CHUNK) as restarted:
        for prompt in prompts[:4]:
            out = one(restarted, prompt, max_tokens=6)
            assert_same_greedy(one(baseline, prompt, max_tokens=6), out)
        state = restarted.call("connector_state")
    assert (state["pins"], state["inflight"]) == (0, 0)


def test_corrupt_truncated_and_foreign_files_are_never_loaded(engine_tmp, tmp_path, baseline):
    prompts = [random_prompt(300, seed=200 + i) for i in range(2)]
    with start_engine(TINY, engine_tmp, env=disk_env(tmp_path), extra_config=CHUNK) as first:
        for prompt in prompts:
            one(first, prompt)
        keys = [first.call("fingerprints", prompt=p)["fingerprints"] for p in prompts]
    flipped = next(p for p in chunk_files(tmp_path) if keys[0][3] in p.name)  # prompt 0's first chunk
    raw = bytearray(flipped.read_bytes())
    for offset in range(-4000, -3000, 97):
        raw[offset] ^= 0x5A
    flipped.write_bytes(bytes(raw))
    truncated = next(p for p in chunk_files(tmp_path) if keys[1][3] in p.name)  # prompt 1's first chunk
    truncated.write_bytes(truncated.read_bytes()[:-512])
    foreign = [
        tmp_path / "notes.txt",
        tmp_path / "model.safetensors",
        tmp_path / f"{'0' * 16}-tp0pp0-{'1' * 32}.lmc.safetensors",
    ]
    for path in foreign:
        path.write_bytes(os.urandom(2048))

    with start_engine(TINY, engine_tmp, env=disk_env(tmp_path), extra_config=CHUNK) as second:
        for prompt in prompts:
            out = one(second, prompt)
            assert_same_greedy(one(baseline, prompt), out)
        second_state = second.call("connector_state")
    for path in (flipped, truncated):  # bad files were removed; what stands there now was rewritten whole
        assert not path.exists() or verifies(path)
    assert all(path.exists() for path in foreign[:2])  # files that are not ours are left alone
    assert second_state["pins"] == 0, second_state


def test_folder_stays_within_its_size_and_recency_survives_a_restart(engine_tmp, tmp_path):
    limit_gb = 10 * FILE_BYTES / 1024**3  # room for 10 chunk files: two and a half 512-token prompts
    env = disk_env(tmp_path, size_gb=limit_gb, LMCACHE_MAX_LOCAL_CPU_SIZE="0.0005")  # memory: 8 chunks
    prompts = [random_prompt(512, seed=300 + i) for i in range(8)]
    with start_engine(TINY, engine_tmp, env=env, extra_config=CHUNK) as first:
        for prompt in prompts[:2]:
            one(first, prompt, max_tokens=2)
            first.call("connector_state")  # let the background writes finish, as between real requests
        time.sleep(0.05)
        assert first.generate([prompts[0]], max_tokens=2)[0]["num_cached_tokens"] == 511  # prompt 0 used again
        for prompt in prompts[2:7]:  # more than the folder holds
            one(first, prompt, max_tokens=2)
            first.call("connector_state")
            assert library_bytes(tmp_path) <= limit_gb * 1024**3
    assert library_bytes(tmp_path) <= limit_gb * 1024**3

    with start_engine(TINY, engine_tmp, env=env, extra_config=CHUNK) as second:
        assert second.generate([prompts[6]], max_tokens=2)[0]["num_cached_tokens"] == 511  # newest: on disk
        assert second.generate([prompts[1]], max_tokens=2)[0]["num_cached_tokens"] == 0  # least recent: gone
        one(second, prompts[7], max_tokens=2)
        assert library_bytes(tmp_path) <= limit_gb * 1024**3


def test_memory_smaller_than_the_working_set_is_backed_by_disk(engine_tmp, tmp_path, baseline):
    env = disk_env(tmp_path, LMCACHE_MAX_LOCAL_CPU_SIZE="0.0005")  # 8 chunk slots: two 512-token prompts
    prompts = [random_prompt(512, seed=400 + i) for i in range(6)]
    with start_engine(TINY, engine_tmp, env=env, extra_config=CHUNK) as engine:
        for prompt in prompts:
            one(engine, prompt)
        before = engine.call("connector_state")["totals"]["hit_tokens_by_tier"].get("disk", 0)
        out = one(engine, prompts[0])  # long evicted from memory
        state = engine.call("connector_state")
    assert out["num_cached_tokens"] == 511
    assert state["totals"]["hit_tokens_by_tier"]["disk"] - before == 511
    assert state["evictions"] > 0
    assert_same_greedy(one(baseline, prompts[0]), out)


def test_two_engines_share_one_folder(engine_tmp, tmp_path, baseline):
    limit_gb = 12 * FILE_BYTES / 1024**3
    env = disk_env(tmp_path, size_gb=limit_gb, LMCACHE_DISK_RESCAN_INTERVAL_SECS="0.5")
    prompts = [random_prompt(512, seed=500 + i) for i in range(10)]
    with (
        start_engine(TINY, engine_tmp, env=env, extra_config=CHUNK) as a,
        start_engine(TINY, engine_tmp, env=env, extra_config=CHUNK) as b,
    ):
        one(a, prompts[0])
        time.sleep(1.5)  # b's background rescan finds a's files
        assert b.generate([prompts[0]], max_tokens=2)[0]["num_cached_tokens"] == 511
        for i, prompt in enumerate(prompts[1:]):  # both write and evict in the same folder
            engine = (a, b)[i % 2]
            assert_same_greedy(one(baseline, prompt), one(engine, prompt))
            assert library_bytes(tmp_path) <= limit_gb * 1024**3
        for prompt in prompts[:4]:  # reads of files the other engine evicted are misses, never errors
            assert_same_greedy(one(baseline, prompt), one(a, prompt))
        assert a.call("connector_state")["pins"] == 0 and b.call("connector_state")["pins"] == 0


def test_an_unusable_disk_folder_does_not_stop_serving(engine_tmp, tmp_path, baseline):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    prompt = random_prompt(400, seed=600)
    with start_engine(TINY, engine_tmp, env=disk_env(blocker / "cache"), extra_config=CHUNK) as engine:
        one(engine, prompt)
        warm = one(engine, prompt)
        state = engine.call("connector_state")
    assert warm["num_cached_tokens"] == 384  # the memory tier still serves
    assert state["disk_chunks"] is None
    assert_same_greedy(one(baseline, prompt), warm)


def test_chunk_files_cannot_be_mistaken_for_another_chunk(tmp_path):
    """A file renamed to another chunk's name fails its header check instead of being loaded."""
    from lmcache_connector.tiers.disk.folder import write_chunk
    from lmcache_connector.tiers.disk.format import ChunkHeader, rank_tag

    a = ChunkHeader("a" * 32, "ab" * 16, rank_tag(0), ("a" * 32,), (1, 1, 64))
    b = ChunkHeader("b" * 32, "ab" * 16, rank_tag(0), ("b" * 32,), (1, 1, 64))
    write_chunk(str(tmp_path), a, [memoryview(bytearray(64))])
    os.rename(tmp_path / a.file_name, tmp_path / b.file_name)
    with pytest.raises(ChunkFileError, match="does not match"):
        read_chunk_into(str(tmp_path / b.file_name), b, [memoryview(bytearray(64))])


def test_a_chunk_in_the_page_cache_loads_at_once_and_an_evicted_one_in_the_background(engine_tmp, tmp_path, baseline):
    # LMCACHE_DISK_ASYNC_FILLS=auto (the default): a warm file is read on the model thread, a file
    # whose pages were dropped is read by the background thread while the request waits.
    warm_prompt, cold_prompt = random_prompt(384, seed=500), random_prompt(384, seed=501)
    with start_engine(TINY, engine_tmp, env=disk_env(tmp_path), extra_config=CHUNK) as first:
        one(first, warm_prompt)
        cold_first = one(first, cold_prompt)
        fps = first.call("fingerprints", prompt=cold_prompt)["fingerprints"]
    cold_files = [
        p for p in chunk_files(tmp_path) if any(p.name.endswith(f"-{fps[i]}.lmc.safetensors") for i in (3, 7, 11))
    ]
    assert len(cold_files) == 3
    for path in cold_files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    with start_engine(TINY, engine_tmp, env=disk_env(tmp_path), extra_config=CHUNK) as second:
        warm = one(second, warm_prompt)
        after_warm = second.call("connector_state", settle=False)["totals"]["background_loads"]
        cold = one(second, cold_prompt)
        after_cold = second.call("connector_state", settle=False)["totals"]["background_loads"]
    assert warm["num_cached_tokens"] == cold["num_cached_tokens"] == 383  # every block; one token is computed
    assert (after_warm, after_cold) == (0, 1)
    assert_same_greedy(one(baseline, warm_prompt), warm)
    assert_same_greedy(cold_first, cold)
