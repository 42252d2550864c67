"""Shared fixtures, and the one rule that sorts every test into one kind (pyproject.toml lists them).

Engines are expensive here (seconds to start), so tests share one engine per configuration
through module-scoped fixtures built with ``vllm_support.start_engine``.

Kinds, by module, so a new test needs no marker of its own:
  engine  starts real vLLM engines: ``test_vllm_*.py``, ``test_server_e2e.py``, and any module that
          imports ``start_engine`` or ``EngineProcess``;
  helm    runs a real ``helm``, or checks deployment manifests: ``test_helm_*.py``, ``test_kserve_*.py``
          (the KServe examples against KServe's CRDs), and any module that imports ``helm_tools``;
  slow    neither, but seconds per test for a reason of its own (below);
  unit    everything else: the fast loop, ``scripts/test.sh -m unit``.
A marker a test sets itself among these wins. ``gpu`` is independent of the kind.
"""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

import pytest

KINDS = ("unit", "engine", "helm", "slow")
ENGINE_MODULES = ("test_vllm_*.py", "test_server_e2e.py")
HELM_MODULES = ("test_helm_*.py", "test_kserve_*.py")
# No engine, but slow by design; not weakened to fit the unit loop.
SLOW_MODULES = {
    "test_sim_random.py": "randomized runs of hundreds of steps on vLLM's real scheduler",
    "test_ops_triton.py": "Triton's interpreter runs every kernel instance in Python",
    "test_redis_sentinel_cluster.py": "Sentinels take seconds to find each other and to fail over; a cluster to form",
    "test_sim_remote.py": "several simulated engines with tensor parallelism, each building vLLM's scheduler",
    "test_sim_peer.py": "several simulated engines with tensor parallelism, each building vLLM's scheduler",
    "test_s3_client.py": "a real moto_server (a Python HTTP server: every S3 call a real request) and timeout checks",
    "test_peer_registry_cluster.py": "a Redis Cluster takes seconds to form",
    "test_engine_api_processes.py": "fresh interpreters that import torch and transformers and load a model",
}
SLOW_TESTS = {
    "test_peer_registry.py::test_a_dead_instance_stops_being_a_holder_within_live_ttl_and_its_keys_expire": (
        "waits for a liveness key and then the holder sets to expire (about a second)"
    ),
    "test_peer_registry.py::test_a_live_instance_keeps_its_entries_past_the_holder_ttl": (
        "outlives the holder TTL on purpose (about a second)"
    ),
    "test_package.py::test_the_installed_vllm_is_accepted_and_the_class_loads_the_vllm_way": (
        "imports vLLM in a fresh interpreter (about 10 s)"
    ),
}


def kind_of(item: pytest.Item) -> str:
    own = [kind for kind in KINDS if item.get_closest_marker(kind)]
    if own:
        return own[0]
    module = Path(str(item.fspath)).name
    names = vars(item.module) if getattr(item, "module", None) else {}
    if any(fnmatch(module, p) for p in ENGINE_MODULES) or {"start_engine", "EngineProcess"} & names.keys():
        return "engine"
    if any(fnmatch(module, p) for p in HELM_MODULES) or "helm_tools" in names:
        return "helm"
    if module in SLOW_MODULES or f"{module}::{getattr(item, 'originalname', item.name)}" in SLOW_TESTS:
        return "slow"
    return "unit"


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        kind = kind_of(item)
        if not item.get_closest_marker(kind):
            item.add_marker(kind)


@pytest.fixture(scope="session")
def engine_tmp(tmp_path_factory) -> Path:
    """vLLM's, torch's and ZMQ's scratch files stay inside the test's temp folder."""
    return tmp_path_factory.mktemp("engine")


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    """A real redis-server for one module's engines (the remote tier's store, or the P2P registry)."""
    import redis_servers

    with redis_servers.redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server
