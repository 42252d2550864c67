"""vLLM-facing statistics: the connector's counters as vLLM's ``KVConnectorStats``.

vLLM gathers one ``KVConnectorStats`` per worker each step, merges them with ``aggregate`` and with
the scheduler's, ships only the ``data`` dict to the front end and rebuilds the object there with
the connector's ``build_kv_connector_stats``. The dict's keys are documented in
:mod:`lmcache_connector.stats`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from .stats import merge


@dataclass
class LMCacheConnectorStats(KVConnectorStats):
    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> LMCacheConnectorStats:
        self.data = merge(self.data, other.data or {})
        return self

    def reduce(self) -> dict[str, int | float]:
        data = self.data
        requested = data.get("requested_tokens", 0)
        hit = data.get("hit_tokens", 0)
        return {
            "hit_tokens": hit,
            "requested_tokens": requested,
            "hit_rate": round(hit / requested, 4) if requested else 0.0,
        }

    def is_empty(self) -> bool:
        return not self.data


def build_stats(data: dict[str, Any] | None) -> LMCacheConnectorStats:
    return LMCacheConnectorStats(data=dict(data or {}))
