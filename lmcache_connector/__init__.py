"""lmcache_connector: a vLLM KV connector that reuses KV caches across requests, restarts and instances.

Use it with ``--kv-transfer-config '{"kv_connector":"LMCacheConnector",
"kv_connector_module_path":"lmcache_connector","kv_role":"kv_both"}'``.

Importing this package is cheap and touches neither vLLM nor a GPU: vLLM imports the connector
class in every process at config time, so ``LMCacheConnector`` is resolved lazily on first access.
"""

from lmcache_connector._version import __version__

__all__ = ["LMCacheConnector", "__version__"]


def __getattr__(name: str):
    if name == "LMCacheConnector":
        from lmcache_connector.connector import LMCacheConnector

        return LMCacheConnector
    raise AttributeError(f"module 'lmcache_connector' has no attribute {name!r}")
