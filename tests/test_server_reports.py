"""After its last request, a real ``vllm serve`` still reports what its workers finish later.

vLLM steps its engine only while it has requests, and the workers' results travel with a step's
output. The connector keeps vLLM's serving loop running empty steps while results are owed
(``connector/idle_steps.py``). Here a real Redis holds every write back: ``CLIENT PAUSE … WRITE``
blocks writes but answers reads, so the lookup is a plain miss and the request is served at once,
while its remote writes land only after the request ended. They must still reach ``/metrics``
without another request.
"""

from __future__ import annotations

import time

import pytest
from server_support import metrics_showing, sample, serve, wait_for

from lmcache_connector.testing.tiny_model import TINY, random_prompt

pytestmark = pytest.mark.engine

WRITE_PAUSE_S = 6


def test_a_write_that_lands_after_the_last_request_reaches_metrics_without_another_request(tmp_path, redis):
    settings = {"LMCACHE_REMOTE_URL": f"redis://127.0.0.1:{redis.port}"}
    prompt = " ".join(f"w{t}" for t in random_prompt(600, seed=7, vocab_size=TINY.vocab_size))
    with serve(tmp_path, settings) as server:
        admin = redis.admin()
        admin.execute_command("CLIENT", "PAUSE", WRITE_PAUSE_S * 1000, "WRITE")
        paused_until = time.monotonic() + WRITE_PAUSE_S
        server.complete(prompt, max_tokens=2)
        ended = server.metrics()
        assert time.monotonic() < paused_until - 1, "the request outlasted the pause: nothing proved"
        assert sample(ended, "lmcache_connector_stored_bytes_total", tier="memory") > 0
        assert sample(ended, "lmcache_connector_stored_bytes_total", tier="remote") == 0  # held by Redis
        assert admin.dbsize() == 0

        metrics = wait_for(
            lambda: metrics_showing(server, "lmcache_connector_stored_bytes_total", "remote"),
            "the remote writes' report",
            timeout=WRITE_PAUSE_S + 15,
        )
        assert admin.dbsize() > 0
        stored = sample(metrics, "lmcache_connector_stored_bytes_total", tier="memory")
        assert sample(metrics, "lmcache_connector_stored_bytes_total", tier="remote") == stored
