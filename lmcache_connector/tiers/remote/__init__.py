"""The remote tier: chunks shared by many engines through a key-value store.

* :mod:`.client` — the contract every store's client keeps (values, block entries, batched
  existence checks, bounded waits, two kinds of error), and :func:`~.client.connect_remote`;
* :mod:`.redis_client`, :mod:`.s3_client`, :mod:`.lm_client` — Redis in every deployment form,
  S3-compatible object stores, LMCache's cache server (``lm://``);
* :mod:`.value` — one value (one rank's copy of one chunk): a bounded, versioned header, then the
  raw bytes; and the block entries that let a prompt sharing part of a chunk find it. No pickle;
* :mod:`.catalog` (scheduler side: lookups in the background, never blocking; down and back),
  :mod:`.store` (worker side: bounded write-behind, verified reads), :mod:`.medium` (the two halves
  behind :mod:`lmcache_connector.tiers.base`).
"""
