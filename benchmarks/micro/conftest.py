"""Micro-benchmarks on pytest-benchmark, each operation beside its ceiling in the same run.

Not part of the test suite: pyproject.toml's ``testpaths`` is ``tests`` and its ``norecursedirs``
has ``benchmarks``, and the files are named ``bench_*.py``, which only this conftest collects.

    .venv/bin/pip install -e .[bench]
    .venv/bin/python -m pytest benchmarks/micro --benchmark-only [--benchmark-autosave] [--benchmark-compare]
"""

from __future__ import annotations

import pytest
from pairs import MEDIANS


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.hasplugin("benchmark"):
        raise pytest.UsageError("benchmarks/micro needs pytest-benchmark: .venv/bin/pip install -e .[bench]")


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself.
    if file_path.name.startswith("bench_") and file_path.suffix == ".py" and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_terminal_summary(terminalreporter) -> None:
    pairs = {group: roles for group, roles in MEDIANS.items() if {"op", "ceiling"} <= roles.keys()}
    if not pairs:
        return
    terminalreporter.section("op / ceiling (throughput ratio of the medians, same run)")
    for group, roles in sorted(pairs.items()):
        peer = f"   op / peer {roles['peer'] / roles['op']:5.2f}" if "peer" in roles else ""
        terminalreporter.write_line(f"{group:36} {roles['ceiling'] / roles['op']:5.2f}{peer}")
