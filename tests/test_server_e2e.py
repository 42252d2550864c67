"""The real serving path: vLLM's OpenAI server with the connector flag, driven over HTTP on loopback.

One server (:mod:`server_support`), with a memory and a disk tier, serves the same long prompt
four times: cold; from memory; recomputed after vLLM's ``/reset_prefix_cache?reset_external=true``
emptied every tier; and from disk, once other prompts pushed it out of the small memory tier.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from server_support import BLOCK, Server, metrics_showing, sample, serve, wait_for

from lmcache_connector.testing.tiny_model import TINY, random_prompt

pytestmark = pytest.mark.engine

PROMPT_TOKENS = 600  # 3 chunks of the default 256 tokens: two full ones and a partial one of 2 blocks
CHUNK_BYTES = 256 * 512  # the tiny model's KV is 512 bytes per token
MEMORY_SLOTS = 4  # the memory tier holds one prompt, not two: the next prompts push it out to disk
OTHER_PROMPTS = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    tmp = tmp_path_factory.mktemp("server")
    (tmp / "disk-cache").mkdir()
    settings = {
        "LMCACHE_MAX_LOCAL_CPU_SIZE": str(MEMORY_SLOTS * CHUNK_BYTES / 1e9),
        "LMCACHE_LOCAL_DISK": str(tmp / "disk-cache"),
        "LMCACHE_MAX_LOCAL_DISK_SIZE": "0.1",
        "VLLM_SERVER_DEV_MODE": "1",  # for /reset_prefix_cache, which empties the memory tier
    }
    with serve(tmp, settings) as server:
        yield server


@dataclass
class Exchange:
    first: dict  # cold
    second: dict  # from the memory tier
    third: dict  # after a connector reset: recomputed
    fourth: dict  # after other prompts took its memory slots: from disk
    before: str  # /metrics before the first request
    after_first: str
    after_second: str
    after_third: str
    after_fourth: str


@pytest.fixture(scope="module")
def exchange(server: Server) -> Exchange:
    """The same ~600-token prompt four times; ``/metrics`` before and after each."""
    prompt = " ".join(f"w{t}" for t in random_prompt(PROMPT_TOKENS, seed=6, vocab_size=TINY.vocab_size))
    before = server.metrics()
    first = server.complete(prompt)
    after_first = wait_for(lambda: metrics_showing(server, "lmcache_connector_stored_bytes_total"), "stores")
    second = server.complete(prompt)
    after_second = wait_for(lambda: metrics_showing(server, "lmcache_connector_loaded_bytes_total"), "loads")

    # Disk writes trail the memory tier; once every chunk is on disk, forget the memory tier.
    stored = sample(after_first, "lmcache_connector_stored_bytes_total", tier="memory")
    wait_for(lambda: metrics_showing(server, "lmcache_connector_stored_bytes_total", "disk", stored), "disk writes")
    wait_for(lambda: _reset_memory_tier(server), "/reset_prefix_cache?reset_external=true to succeed")
    third = server.complete(prompt)
    # A connector reset forgets every tier (disk files included): the third request is recomputed,
    # and its chunks are stored (and written to disk) again.
    after_third = wait_for(
        lambda: metrics_showing(server, "lmcache_connector_stored_bytes_total", "disk", 2 * stored), "disk rewrites"
    )
    # Other prompts take the memory tier's slots; the prompt's chunks remain on disk only.
    for seed in range(OTHER_PROMPTS):
        other = " ".join(f"w{t}" for t in random_prompt(PROMPT_TOKENS, seed=100 + seed, vocab_size=TINY.vocab_size))
        server.complete(other)
    stored_all = (2 + OTHER_PROMPTS) * stored
    wait_for(lambda: metrics_showing(server, "lmcache_connector_stored_bytes_total", "disk", stored_all), "writes")
    fourth = server.complete(prompt)
    after_fourth = wait_for(lambda: metrics_showing(server, "lmcache_connector_loaded_bytes_total", "disk"), "loads")
    return Exchange(first, second, third, fourth, before, after_first, after_second, after_third, after_fourth)


def _reset_memory_tier(server: Server) -> bool:
    response = requests.post(f"{server.url}/reset_prefix_cache", params={"reset_external": "true"}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["success"]  # false while blocks are still held: try again


def _cached(response: dict) -> int:
    return (response["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def test_repeated_prompt_over_http_gives_the_same_answer_from_the_cache(exchange):
    assert exchange.first["usage"]["prompt_tokens"] == PROMPT_TOKENS
    assert _cached(exchange.first) == 0
    # Every whole block of the prompt came from the cache; only the tail was computed.
    assert _cached(exchange.second) == PROMPT_TOKENS // BLOCK * BLOCK
    assert exchange.second["choices"][0]["text"] == exchange.first["choices"][0]["text"]


def test_metrics_show_hit_tokens_and_bytes_of_the_memory_tier(exchange):
    hits = _cached(exchange.second)
    before, first, after = exchange.before, exchange.after_first, exchange.after_second

    assert sample(before, "lmcache_connector_hit_tokens_total") == 0
    assert sample(after, "lmcache_connector_hit_tokens_total") == hits
    assert sample(after, "lmcache_connector_hit_tokens_by_tier_total", tier="memory") == hits
    assert sample(after, "lmcache_connector_requested_tokens_total") == 2 * PROMPT_TOKENS
    assert sample(after, "lmcache_connector_hit_rate") == pytest.approx(hits / (2 * PROMPT_TOKENS))

    stored = sample(first, "lmcache_connector_stored_bytes_total", tier="memory")
    loaded = sample(after, "lmcache_connector_loaded_bytes_total", tier="memory")
    assert stored > 0
    assert loaded == stored  # the whole stored prompt came back
    assert sample(after, "lmcache_connector_loaded_bytes_total", tier="disk") == 0
    assert (
        0
        < sample(after, "lmcache_connector_usage_bytes", tier="memory")
        <= sample(after, "lmcache_connector_capacity_bytes", tier="memory")
    )
    assert sample(after, "lmcache_connector_failed_loads_total") == 0


def test_vllm_attributes_the_hits_to_host_memory(exchange):
    hits = _cached(exchange.second)
    name = "vllm:prompt_tokens_cached_by_source_total"
    assert sample(exchange.after_second, name, source="host") - sample(exchange.before, name, source="host") == hits
    for source in ("device", "disk", "p2p", "external_unspecified"):
        assert sample(exchange.after_second, name, source=source) == 0


def test_after_a_connector_reset_no_tier_serves_the_prompt(exchange):
    assert _cached(exchange.third) == 0  # memory and disk were both cleared by the reset
    assert exchange.third["choices"][0]["text"] == exchange.first["choices"][0]["text"]
    before, after = exchange.after_second, exchange.after_third
    assert sample(after, "lmcache_connector_hit_tokens_by_tier_total", tier="disk") == 0
    name = "vllm:prompt_tokens_cached_by_source_total"
    assert sample(after, name, source="disk") == sample(before, name, source="disk")


def test_a_prompt_the_memory_tier_evicted_is_served_from_disk(exchange):
    assert _cached(exchange.fourth) == PROMPT_TOKENS // BLOCK * BLOCK
    assert exchange.fourth["choices"][0]["text"] == exchange.first["choices"][0]["text"]
    before, after = exchange.after_third, exchange.after_fourth
    assert sample(after, "lmcache_connector_evictions_total", tier="memory") > 0
    disk_hits = sample(after, "lmcache_connector_hit_tokens_by_tier_total", tier="disk")
    assert disk_hits - sample(before, "lmcache_connector_hit_tokens_by_tier_total", tier="disk") == _cached(
        exchange.fourth
    )
    name = "vllm:prompt_tokens_cached_by_source_total"
    assert sample(after, name, source="disk") - sample(before, name, source="disk") == _cached(exchange.fourth)
    assert sample(after, "lmcache_connector_failed_loads_total") == 0


def test_the_cli_finds_the_servers_disk_folder_intact(server, exchange):
    cli = Path(sys.executable).with_name("lmcache-connector")
    folder = server.folder / "disk-cache"
    result = subprocess.run([str(cli), "disk", "verify", str(folder)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    files = 3 * (1 + OTHER_PROMPTS)  # three chunks per prompt
    assert "0 damaged" in result.stdout and f"checked {files} chunk files: {files} intact" in result.stdout


def test_stats_log_reports_the_hit_rate(server, exchange):
    def hit_line():
        lines = [line for line in server.log.read_text(errors="replace").splitlines() if "KV Transfer metrics:" in line]
        return next((line for line in lines if "hit_tokens=0," not in line), None)

    line = wait_for(hit_line, "a 'KV Transfer metrics' log line with hits")
    assert "hit_rate=" in line and "loaded_MiB.memory=" in line


def test_server_stays_healthy(server, exchange):
    assert requests.get(f"{server.url}/health", timeout=5).status_code == 200
