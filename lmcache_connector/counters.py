"""Counters the connector keeps while serving: what vLLM's stats log and ``/metrics`` show.

Both halves count into a :class:`Counters` (plain numbers, no locks: each half runs on one thread),
and vLLM collects them once per step through ``get_kv_connector_stats``: the workers' counters are
summed across ranks and merged with the scheduler's, and only the flat ``dict`` travels to the
front end, where :mod:`lmcache_connector.connector.metrics` turns it into Prometheus series.

Keys of the dict (``tier`` is ``memory``, ``disk``, ``peer`` or ``remote``):

* counters (summed across workers and steps):
  ``requested_tokens``, ``hit_tokens``, ``hit_tokens.<tier>``, ``lookups``,
  ``stored_bytes.<tier>``, ``store_seconds.<tier>``, ``loaded_bytes.<tier>``, ``load_seconds.<tier>``,
  ``evictions.<tier>``, ``dropped_stores``, ``failed_loads``, ``failed_stores.<tier>``,
  ``failed_reads.<tier>`` (reads of a chunk from a tier that found nothing usable; the load that
  needed it then fails too, counted once in ``failed_loads``),
  ``dropped_writes.<tier>`` (writes a secondary tier dropped: its queue was full or it was down),
  ``bad_values.<tier>`` (values under a valid key that were not the chunk asked for),
  ``remote_failures`` (calls to a remote store, a peer or the P2P registry that failed or timed out),
  ``served_chunks.peer`` and ``served_bytes.peer`` (chunks this instance's peer servers sent);
* gauges (the latest value wins; set by the scheduler): ``usage_bytes.<tier>``, ``capacity_bytes.<tier>``,
  ``tier_up.<tier>`` (1 while a secondary tier is reachable, 0 while it is down).
"""

from __future__ import annotations

from collections import Counter

TIERS = ("memory", "disk", "peer", "remote")
GAUGE_PREFIXES = ("usage_bytes.", "capacity_bytes.", "tier_up.")


def is_gauge(key: str) -> bool:
    return key.startswith(GAUGE_PREFIXES)


class Counters:
    """Per-process counters since the last :meth:`take`; gauges keep their last value."""

    def __init__(self) -> None:
        self._counts: Counter = Counter()
        self._totals: Counter = Counter()
        self._gauges: dict[str, float] = {}

    def add(self, key: str, amount: float = 1) -> None:
        self._counts[key] += amount
        self._totals[key] += amount

    def totals(self) -> dict[str, float]:
        """Every counter since start, never reset (for ``state()``: tests and debugging)."""
        return dict(self._totals)

    def set_gauge(self, key: str, value: float) -> None:
        self._gauges[key] = value

    def take(self) -> dict[str, float]:
        """Counters since the last call (then reset) plus the current gauges; ``{}`` if nothing changed."""
        data = {k: v for k, v in self._counts.items() if v}
        self._counts.clear()
        if data or self._gauges_changed():
            data.update(self._gauges)
        return data

    def _gauges_changed(self) -> bool:
        snapshot = tuple(sorted(self._gauges.items()))
        changed = snapshot != getattr(self, "_last_gauges", None)
        self._last_gauges = snapshot
        return changed


def merge(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Combine two stats dicts: counters add up, gauges take the larger (only one side sets them)."""
    out = dict(a)
    for key, value in b.items():
        if is_gauge(key):
            out[key] = max(out.get(key, value), value)
        else:
            out[key] = out.get(key, 0) + value
    return out
