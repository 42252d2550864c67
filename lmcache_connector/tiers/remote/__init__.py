"""The remote tier: chunks shared by many engines through a Redis store (issue 11). Groundwork only.

What exists, proven against real servers (``tests/test_remote_value.py``,
``tests/test_redis_client.py``, ``tests/test_redis_sentinel_cluster.py``):

* :mod:`.value` — the format of one value (one rank's copy of one chunk): a bounded, versioned JSON
  header (namespace digest, rank, chunk key, every block-boundary fingerprint, shape, xxh3-64
  checksum) then the raw bytes; decoding verifies and copies into the caller's buffers, and tells
  foreign, other-version, truncated and corrupt values apart. Nothing is ever unpickled.
* :mod:`.redis_client` — a client for every ``LMCACHE_REMOTE_URL`` Redis form (``redis://``,
  ``rediss://``, ``unix://``, ``redis-sentinel://``, ``redis-cluster://``) and the
  ``LMCACHE_REMOTE_*`` settings (password files, TLS, TTL, key prefix): batched ``exists_many``,
  ``put`` (value plus block entries in one pipeline, one TTL), ``get`` (a hit refreshes the TTL),
  ``resolve_side_keys``, ``expire_many``, ``delete_many``, ``ping``; every wait bounded by the
  socket timeout; failures are :class:`~.redis_client.RemoteUnavailableError` or
  :class:`~.redis_client.RemoteAuthError` (naming the setting to fix).

Still to build (nothing here is registered in ``tiers/registry.py`` or used by the connector yet):

* ``catalog.py`` (scheduler side, :class:`lmcache_connector.tiers.base.Catalog`): answers from what
  it knows; unknown keys go to a background thread that checks them with one ``exists_many`` per
  batch (every rank's value key, and the block entries through ``resolve_side_keys`` for partial
  matches), answering :data:`~lmcache_connector.tiers.base.PENDING` until then and a miss after
  ``LMCACHE_REMOTE_LOOKUP_TIMEOUT_MS``; a tier whose lookups time out is marked down (one warning)
  and skipped until a half-open background ``ping`` succeeds (one warning when it is back);
  ``touch`` refreshes TTLs with ``expire_many``.
* ``store.py`` (worker side, :class:`lmcache_connector.tiers.base.Store`): writes behind the memory
  tier through a bounded queue (a full queue drops and counts the write), skipping chunks the store
  already holds; asynchronous fills (``Catalog.asynchronous``) that ``get`` and ``decode_value``
  into the memory slot, mapping every ``RemoteValueError`` and ``RemoteUnavailableError`` to
  :class:`~lmcache_connector.tiers.base.ChunkMiss` (counted by kind).
* ``medium.py`` and its registration, metrics per tier (hits, bytes, seconds, dropped stores,
  failures, up/down state), ``lmcache-connector config --check-remote``, and the engine tests of
  issue 11 (two engines sharing a server of each kind, outages, bad values, eviction).
"""
