"""Each micro-benchmark is one member of a pytest-benchmark group: an operation, or its ceiling.

The ceiling (``role="ceiling"``) runs first, the operation (``role="op"``) right after it on the
same bytes and buffers; a group may also hold a ``peer`` (a plain implementation of the same job,
for where the time goes). Every result gets its throughput in ``extra_info`` (so the JSON that
``--benchmark-autosave`` / ``--benchmark-json`` writes has it), an operation also its ratios;
the conftest prints the ratios after pytest-benchmark's tables.
"""

from __future__ import annotations

from collections.abc import Callable

MEDIANS: dict[str, dict[str, float]] = {}  # group -> role -> median seconds of one call


def measure(benchmark, group: str, role: str, run: Callable[[], object], nbytes: int) -> None:
    """Benchmark ``run`` (moving ``nbytes`` per call) as the ``role`` of ``group``."""
    assert role in ("ceiling", "peer", "op"), role
    benchmark.group = group
    benchmark.extra_info.update(role=role, bytes=nbytes)
    benchmark(run)
    if benchmark.stats is None:
        return  # --benchmark-disable: ran once as a plain test, nothing was measured
    median = benchmark.stats.stats.median
    benchmark.extra_info["GBps"] = round(nbytes / median / 1e9, 3)
    MEDIANS.setdefault(group, {})[role] = median
    if role == "op":
        for reference, seconds in MEDIANS[group].items():
            if reference != "op":
                benchmark.extra_info[f"ratio_to_{reference}"] = round(seconds / median, 3)
