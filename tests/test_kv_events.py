"""KV-cache events for routers, without an engine: the memory index and the disk catalog record
which chunks they hold, and the connector turns that into vLLM's ``BlockStored`` / ``BlockRemoved``
under vLLM's real scheduler (the simulation harness), next to the ``GPU`` events vLLM's own block
pool publishes. The real engine publishing over ZMQ is ``test_vllm_kv_events.py``."""

from __future__ import annotations

import time

import pytest
from sim_harness import SimFactory, clear_lmcache_env
from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

from lmcache_connector.connector.kv_events import ChunkBlocks
from lmcache_connector.testing.tiny_model import random_prompt
from lmcache_connector.tiers.disk.catalog import DiskCatalog
from lmcache_connector.tiers.disk.folder import write_chunk
from lmcache_connector.tiers.disk.format import ChunkHeader, rank_tag, read_header
from lmcache_connector.tiers.memory.index import ChunkIndex

BS = 16  # the simulation's block size; its chunks are 2 blocks


@pytest.fixture
def make_sim(tmp_path, monkeypatch):
    clear_lmcache_env(monkeypatch)
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    factory = SimFactory(tmp_path)
    yield factory
    factory.close()


def serve(sim, tokens, max_tokens=1) -> str:
    req_id = sim.add_request(list(tokens), max_tokens=max_tokens)
    sim.run()
    sim.settle()
    return req_id


def blocks_of(events, medium: str) -> dict:
    """Block hash -> (parent hash, tokens) of every block a ``BlockStored`` of ``medium`` announced."""
    blocks = {}
    for event in events:
        if isinstance(event, BlockStored) and event.medium == medium:
            for i, h in enumerate(event.block_hashes):
                parent = event.parent_block_hash if i == 0 else event.block_hashes[i - 1]
                blocks[h] = (parent, list(event.token_ids[i * event.block_size : (i + 1) * event.block_size]))
    return blocks


def stored_hashes(events, medium: str) -> list:
    return [h for e in events if isinstance(e, BlockStored) and e.medium == medium for h in e.block_hashes]


def live(events, medium: str) -> set:
    """What a router's index holds for ``medium`` after the stream; it must be coherent: a block is
    never stored twice while held, nor removed while not held."""
    held: set = set()
    for event in events:
        if getattr(event, "medium", None) != medium:
            continue
        for h in event.block_hashes:
            if isinstance(event, BlockStored):
                assert h not in held, f"{medium} block {h} announced twice"
                held.add(h)
            else:
                assert h in held, f"{medium} block {h} removed while not announced"
                held.discard(h)
    return held


def vllm_hashes(sim, tokens) -> list:
    """vLLM's block hashes of ``tokens`` as its events carry them (ints, by default)."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash
    from vllm.v1.request import Request

    request = Request("probe", list(tokens), SamplingParams(max_tokens=1), None, block_hasher=sim.block_hasher)
    return [maybe_convert_block_hash(h) for h in request.block_hashes]


# ---------------------------------------------------------------- the bookkeeping alone


def test_the_memory_index_records_what_it_starts_and_stops_holding():
    index = ChunkIndex(num_slots=2, blocks_per_chunk=2, block_bytes=10)
    index.prepare_store(b"a0", (b"a0",))
    index.complete_store(b"a0", ok=True)
    index.track_changes()  # what is held already comes first
    index.prepare_store(b"a1", (b"a0", b"a1"))  # the partial chunk a0 grown to full: a0 is dropped
    index.complete_store(b"a1", ok=True)
    index.prepare_store(b"b1", (b"b0", b"b1"))
    index.complete_store(b"b1", ok=False)  # a failed store was never held
    index.prepare_store(b"c1", (b"c0", b"c1"))
    index.complete_store(b"c1", ok=True)
    index.prepare_store(b"d1", (b"d0", b"d1"))  # two slots: the least recent, a1, is evicted
    index.complete_store(b"d1", ok=True)
    index.pin([b"c1"])
    index.clear()  # a pinned chunk stops being held at once, its slot waits for the unpin
    assert index.take_changes() == [
        (b"a0", True),
        (b"a1", True),
        (b"a0", False),
        (b"c1", True),
        (b"a1", False),
        (b"d1", True),
        (b"c1", False),
        (b"d1", False),
    ]
    index.unpin([b"c1"])
    assert index.take_changes() == []


def test_disk_catalog_records_changes_and_describes_what_it_held_at_start(tmp_path):
    ns = "ab" * 16
    tag = rank_tag(0)
    described = ChunkHeader("a" * 32, ns, tag, ("a" * 32,), (1, 1, 64), event_info='{"x":1}')
    old = ChunkHeader("b" * 32, ns, tag, ("b" * 32,), (1, 1, 64))  # written without events: no event_info
    for header in (described, old):
        write_chunk(str(tmp_path), header, [memoryview(bytearray(64))])
    assert read_header(str(tmp_path / described.file_name))[0].event_info == '{"x":1}'
    assert read_header(str(tmp_path / old.file_name))[0].event_info == ""

    catalog = DiskCatalog(str(tmp_path), ns, [tag], rescan_interval_s=3600)
    try:
        assert len(catalog) == 2
        catalog.track_changes()
        changes: list = []
        deadline = time.monotonic() + 10
        while len(changes) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
            catalog.poll()
            changes += catalog.take_changes()
        assert sorted(changes) == [(bytes.fromhex("a" * 32), True, '{"x":1}'), (bytes.fromhex("b" * 32), True, "")]
        catalog.add(b"\x01" * 16, (b"\x01" * 16,), 64)
        catalog.clear()
        assert catalog.take_changes()[0] == (b"\x01" * 16, True, "")
    finally:
        catalog.close()


def test_block_descriptions_survive_json_only_under_the_same_hash_settings():
    blocks = ChunkBlocks(
        hashes=(b"\x01" * 32, b"\x02" * 32),
        parent=b"\x00" * 32,
        token_ids=tuple(range(2 * BS)),
        block_size=BS,
        lora_name="adapter",
        lora_id=3,
        extra_keys=(("adapter", ("mm0", 4)), ("adapter",)),
    )
    text = blocks.to_json("sha256_cbor:abcd:16:vllm-0.32.0")
    assert ChunkBlocks.from_json(text, "sha256_cbor:abcd:16:vllm-0.32.0") == blocks
    assert ChunkBlocks.from_json(text, "sha256_cbor:ef01:16:vllm-0.32.0") is None  # another seed
    assert ChunkBlocks.from_json(text[:-5], "sha256_cbor:abcd:16:vllm-0.32.0") is None
    assert ChunkBlocks.from_json("", "sha256_cbor:abcd:16:vllm-0.32.0") is None


# ---------------------------------------------------------------- under vLLM's real scheduler


def test_memory_tier_announces_exactly_the_blocks_vllm_announces_on_gpu(make_sim):
    sim = make_sim(kv_events=True, prefix_caching=True)
    prompt = random_prompt(5 * BS + 7, seed=1)  # 5 whole blocks: chunks of 2, 2 and a partial 1
    serve(sim, prompt)
    gpu, cpu = blocks_of(sim.kv_events, "GPU"), blocks_of(sim.kv_events, "CPU")
    assert stored_hashes(sim.kv_events, "CPU") == vllm_hashes(sim, prompt)[:5]
    assert cpu == {h: gpu[h] for h in stored_hashes(sim.kv_events, "GPU")[:5]}  # same parents, same tokens
    assert all(isinstance(e, BlockStored) for e in sim.kv_events if e.medium == "CPU")
    sim.assert_clean()


def test_with_tensor_parallelism_each_block_is_announced_once_when_every_rank_holds_it(make_sim):
    sim = make_sim(kv_events=True, disk=True, prefix_caching=False, tp=2)
    prompt = random_prompt(4 * BS + 5, seed=13)
    serve(sim, prompt)
    hashes = set(vllm_hashes(sim, prompt)[:4])
    assert live(sim.kv_events, "CPU") == live(sim.kv_events, "STORAGE") == hashes  # live() refuses doubles
    sim.assert_clean()


def test_a_partial_chunk_stored_in_full_keeps_its_blocks_announced_until_both_are_gone(make_sim):
    sim = make_sim(kv_events=True, prefix_caching=False, memory_chunks=3)
    document = random_prompt(4 * BS, seed=2)
    serve(sim, document[: 3 * BS] + [7])  # chunks [0, 1] and the partial [2]
    serve(sim, document + [7])  # chunk [2, 3] holds block 2 too
    assert live(sim.kv_events, "CPU") == set(vllm_hashes(sim, document))
    other = random_prompt(6 * BS, seed=12)
    serve(sim, other + [7])  # three chunks: every chunk of the document is evicted
    assert live(sim.kv_events, "CPU") == set(vllm_hashes(sim, other))  # each block removed once, at the end


def test_memory_evictions_are_removed_and_disk_copies_stay_announced(make_sim):
    sim = make_sim(kv_events=True, disk=True, prefix_caching=False, memory_chunks=2)
    first, second = random_prompt(4 * BS, seed=3), random_prompt(4 * BS, seed=4)
    serve(sim, first + [7])
    serve(sim, second + [7])  # both of the first prompt's chunks leave memory
    first_hashes, second_hashes = set(vllm_hashes(sim, first)), set(vllm_hashes(sim, second))
    removed = {h for e in sim.kv_events if isinstance(e, BlockRemoved) and e.medium == "CPU" for h in e.block_hashes}
    assert removed == first_hashes
    assert live(sim.kv_events, "CPU") == second_hashes
    assert live(sim.kv_events, "STORAGE") == first_hashes | second_hashes
    sim.assert_clean()


def test_a_reset_removes_every_block_per_medium_and_leaves_the_gpu_to_vllm(make_sim):
    sim = make_sim(kv_events=True, disk=True, prefix_caching=True)
    prompt = random_prompt(4 * BS, seed=5)
    serve(sim, prompt + [7])
    assert sim.scheduler.reset_prefix_cache(reset_connector=True)
    serve(sim, [5, 6, 7])  # vLLM publishes with the next step
    assert live(sim.kv_events, "CPU") == live(sim.kv_events, "STORAGE") == set()
    cleared = [e for e in sim.kv_events if isinstance(e, AllBlocksCleared)]
    assert len(cleared) == 1  # vLLM's own, for its GPU blocks; never one from the connector


def test_disk_blocks_are_announced_again_after_a_restart(make_sim):
    sim = make_sim(kv_events=True, disk=True, prefix_caching=False, hash_algo="sha256_cbor")
    prompt = random_prompt(5 * BS + 3, seed=6)
    serve(sim, prompt)
    announced = live(sim.kv_events, "STORAGE")
    assert announced == set(vllm_hashes(sim, prompt)[:5])
    restarted = make_sim.restart(sim)
    again = _first_announcements(restarted, "STORAGE", len(announced))
    assert set(again) == announced
    assert blocks_of(restarted.kv_events, "STORAGE") == blocks_of(sim.kv_events, "STORAGE")


def test_disk_blocks_hashed_under_another_seed_are_served_but_not_announced(make_sim, monkeypatch):
    sim = make_sim(kv_events=True, disk=True, prefix_caching=False)
    prompt = random_prompt(4 * BS + 3, seed=7)
    serve(sim, prompt)
    monkeypatch.setenv("PYTHONHASHSEED", "12345")  # vLLM's NONE_HASH, so every block hash, changes
    restarted = make_sim.restart(sim)
    deadline = time.monotonic() + 10
    while restarted.connector.events.state()["not_announced"] < 2 and time.monotonic() < deadline:
        serve(restarted, [5, 6, 7])  # the folder is described in the background, taken in at a step
        time.sleep(0.01)
    assert restarted.connector.events.state()["not_announced"] == 2  # both chunks: seen, not announced
    assert stored_hashes(restarted.kv_events, "STORAGE") == []
    req_id = serve(restarted, prompt)  # loaded from disk into memory: announced with today's hashes
    assert restarted.hit_tokens(req_id) == 4 * BS
    assert stored_hashes(restarted.kv_events, "CPU") == vllm_hashes(restarted, prompt)[:4]


def test_with_events_off_nothing_is_tracked_or_written(make_sim):
    sim = make_sim(disk=True, prefix_caching=False)
    serve(sim, random_prompt(2 * BS + 1, seed=8))
    assert sim.connector.events is None and list(sim.connector.take_events()) == []
    files = list(sim.disk_dir.glob("*.lmc.safetensors"))
    assert files and all(read_header(str(f))[0].event_info == "" for f in files)

    on = make_sim(kv_events=True, disk=True, prefix_caching=False)
    serve(on, random_prompt(2 * BS + 1, seed=9))
    files = list(on.disk_dir.glob("*.lmc.safetensors"))
    assert files and all(read_header(str(f))[0].event_info for f in files)


def _first_announcements(sim, medium: str, count: int) -> list:
    """Step tiny requests until ``count`` blocks of ``medium`` were announced (vLLM publishes the
    connector's events after a step; the disk catalog describes its folder in the background)."""
    deadline = time.monotonic() + 10
    while len(stored_hashes(sim.kv_events, medium)) < count and time.monotonic() < deadline:
        serve(sim, [5, 6, 7])
        time.sleep(0.01)
    return stored_hashes(sim.kv_events, medium)
