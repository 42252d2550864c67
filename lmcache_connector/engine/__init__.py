"""Custom engines: the connector's cache behind a small in-process API, no vLLM needed.

Research code, evaluation harnesses and servers built on Hugging Face ``transformers`` get the same
tiers (memory, disk, remote) and the same ``LMCACHE_*`` configuration as the vLLM connector::

    from lmcache_connector.engine import KVCache

    with KVCache.for_model(model) as cache:            # shape, dtype and identity from the model
        n = cache.lookup(ids)                           # tokens held (whole blocks of BLOCK_SIZE)
        cache.store(ids, out.past_key_values)           # a DynamicCache, or (K, V) per layer
        hit = cache.retrieve(ids[:-1], as_cache=True)   # (num_tokens, DynamicCache) or None

It drives the same planner, executor and tiers as the connector (:mod:`.kv_cache`); keys follow
the same rules, in a namespace of their own (:data:`~.shape.LAYOUT_TAG`), so chunks stored here and
by vLLM never match. Importing it loads torch, never vLLM; ``transformers`` only when a
``DynamicCache`` is asked for.
"""

from lmcache_connector.engine.kv_cache import KVCache
from lmcache_connector.engine.shape import BLOCK_SIZE, LAYOUT_TAG

__all__ = ["BLOCK_SIZE", "LAYOUT_TAG", "KVCache"]
