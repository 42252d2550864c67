"""The layering holds: the core imports no vLLM (nor torch, where it moves no bytes), and the vLLM
glue in ``connector/`` reaches no medium's internals."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lmcache_connector"


# Every medium's catalog, found by its file name, so a new medium is held to the rule on arrival.
CATALOGS = sorted(f"lmcache_connector.tiers.{p.parent.name}.catalog" for p in PACKAGE.glob("tiers/*/catalog.py"))


@pytest.mark.parametrize(
    "module",
    [
        "lmcache_connector.planner",
        "lmcache_connector.plan",
        "lmcache_connector.ledger",
        "lmcache_connector.failed_blocks",
        "lmcache_connector.tiers.chain",
        "lmcache_connector.tiers.memory.index",
        *CATALOGS,
    ],
)
def test_the_planner_side_imports_neither_torch_nor_vllm(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'vllm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_medium_folder_is_checked():
    assert "lmcache_connector.tiers.disk.catalog" in CATALOGS


def test_the_executor_imports_no_vllm():
    code = "import sys, lmcache_connector.executor; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


ALLOWED_TIER_MODULES = {"lmcache_connector.tiers.registry", "lmcache_connector.tiers.base"}


def _imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


def test_the_vllm_glue_reaches_no_medium_internals():
    for path in (PACKAGE / "connector").glob("*.py"):
        for name in _imported_modules(path):
            if name.startswith("lmcache_connector.tiers"):
                assert name in ALLOWED_TIER_MODULES, f"connector/{path.name} imports {name}"


def test_the_core_knows_media_only_through_the_contract():
    for core in ("planner.py", "executor.py"):
        for name in _imported_modules(PACKAGE / core):
            if name.startswith("lmcache_connector.tiers.") and name not in ALLOWED_TIER_MODULES:
                # The memory tier is the core's own; the lookup chain walks the contract.
                assert name.startswith(("lmcache_connector.tiers.memory", "lmcache_connector.tiers.chain")), name


def test_the_engine_api_uses_the_core_and_the_tier_contract_only():
    """``engine/`` drives the planner and executor as the vLLM glue does: no vLLM, no glue, no medium's internals."""
    for path in (PACKAGE / "engine").glob("*.py"):
        for name in _imported_modules(path):
            assert not name.startswith(("vllm", "lmcache_connector.connector")), f"engine/{path.name} imports {name}"
            if name.startswith("lmcache_connector.tiers"):
                assert name in ALLOWED_TIER_MODULES, f"engine/{path.name} imports {name}"
