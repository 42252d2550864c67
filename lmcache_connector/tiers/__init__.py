"""Media that hold chunk bytes by slot or key: the memory pool (and, later, disk and remote tiers).

Tiers hold bytes only; which chunk lives where, and when it may be evicted, is the index's business
(``lmcache_connector.tiers.memory.index``), kept on the scheduler side.
"""
