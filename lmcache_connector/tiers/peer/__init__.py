"""The peer tier: instances fetch chunks from each other's memory and disk, found through a Redis registry.

``LMCACHE_ENABLE_P2P=True`` turns it on: :mod:`.medium` builds the scheduler's :mod:`.catalog` and
each worker rank's :mod:`.store` from the configuration; the lookup chain is memory -> disk ->
peer -> remote. The pieces they are made of, each tested alone:

* :mod:`.catalog` — the scheduler side: hits from the registry view, publishing what this
  instance holds; :mod:`.store` — a worker rank's server over its memory and disk, and its fetches;
* :mod:`.addresses` — where a worker listens (``LMCACHE_DISTRIBUTED_URL`` port + worker rank), how
  an instance is named in the registry (address and incarnation);
* :mod:`.protocol` — the framed binary wire format, its limits, and exact-length reads under a deadline;
* :mod:`.auth` — the optional shared-token HMAC challenge (``LMCACHE_P2P_AUTH_TOKEN``);
* :mod:`.source` — the contract of what a server reads chunks from (copy, then confirm), and the
  per-slot generation table a memory pool uses to keep it;
* :mod:`.server` — one worker rank's peer server; :mod:`.client` — fetches into caller buffers,
  and the per-peer back-off;
* :mod:`.registry` — the Redis key layout (holders, block entries, liveness) and its operations;
  :mod:`.publisher` — publishes, withdraws and heartbeats in the background;
  :mod:`.view` — the scheduler side's local view of the registry, answered from memory.

Standard library, ``xxhash`` and redis-py only: nothing here imports torch or vLLM.
"""
