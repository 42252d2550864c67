"""The vLLM glue: ``LMCacheConnector`` and its scheduler- and worker-side halves.

Importing this package imports vLLM (after checking its version); the top-level package defers
that until ``lmcache_connector.LMCacheConnector`` is first used.
"""

from lmcache_connector.vllm_version import check_vllm_version

check_vllm_version()

from lmcache_connector.connector.connector import LMCacheConnector  # noqa: E402

__all__ = ["LMCacheConnector"]
