"""Each micro-benchmark is one half of a pair: an operation, or its ceiling, in one pytest-benchmark group.

The ceiling (``role="ceiling"``) runs first, the operation (``role="op"``) right after it on the
same bytes and buffers. Every result gets its throughput in ``extra_info`` (so the JSON that
``--benchmark-autosave`` / ``--benchmark-json`` writes has it), an operation also its ratio to
the ceiling; the conftest prints the ratios after pytest-benchmark's tables.
"""

from __future__ import annotations

from collections.abc import Callable

MEDIANS: dict[str, dict[str, float]] = {}  # group -> role -> median seconds of one call


def measure(benchmark, group: str, role: str, run: Callable[[], object], nbytes: int) -> None:
    """Benchmark ``run`` (moving ``nbytes`` per call) as the ``role`` of ``group``."""
    assert role in ("ceiling", "op"), role
    benchmark.group = group
    benchmark.extra_info.update(role=role, bytes=nbytes)
    benchmark(run)
    if benchmark.stats is None:
        return  # --benchmark-disable: ran once as a plain test, nothing was measured
    median = benchmark.stats.stats.median
    benchmark.extra_info["GBps"] = round(nbytes / median / 1e9, 3)
    MEDIANS.setdefault(group, {})[role] = median
    ceiling = MEDIANS[group].get("ceiling")
    if role == "op" and ceiling:
        benchmark.extra_info["ratio_to_ceiling"] = round(ceiling / median, 3)
