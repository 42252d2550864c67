"""The remote tier behind the tier contract: a store shared by many engines (Redis, S3, LMCache's server).

Enabled by ``LMCACHE_REMOTE_URL`` in any form that has a client (:func:`~.client.served`): the Redis
forms ``redis://``, ``rediss://``, ``unix://``, ``redis-sentinel://``, ``redis-cluster://``; ``s3://``
(an S3-compatible object store); ``lm://`` (LMCache's cache server). The scheduler builds a
:class:`~.catalog.RemoteCatalog`, each worker rank a :class:`~.store.RemoteStore`, each with its
own connections; both speak only the client contract of :mod:`.client`.

At start the scheduler side checks the store once: credentials the store refuses, or a missing
client package, stop the engine with a message naming the setting or the extra to install (a
tier the operator configured must not silently vanish); a store that does not answer is only a
warning: the tier starts *down* and comes up when a background probe reaches it.
"""

from __future__ import annotations

from lmcache_connector.keys import rank_tag
from lmcache_connector.tiers.base import Catalog, Medium, Store
from lmcache_connector.tiers.remote.catalog import RemoteCatalog
from lmcache_connector.tiers.remote.client import answers_at_start, connect_remote, served
from lmcache_connector.tiers.remote.store import RemoteStore

LOOKUP_SOCKET_TIMEOUT_S = 2.0  # the catalog's calls; a lookup's own deadline is far shorter


class RemoteMedium(Medium):
    name = "remote"

    def catalog(self, config, geometry) -> Catalog | None:
        url = config.parsed_remote_url
        if not served(url):
            return None
        timeout = min(config.blocking_timeout_secs, LOOKUP_SOCKET_TIMEOUT_S)
        client = connect_remote(url, config, socket_timeout_secs=timeout)
        up = answers_at_start("the remote tier", url, client.ping, client.close, without="without it")
        ns = geometry.namespace
        ranks = [rank_tag(tp, pp) for tp in range(ns.tp_size) for pp in range(ns.pp_size)]
        return RemoteCatalog(
            client,
            ns.digest().hex(),
            ranks,
            lookup_timeout_s=config.remote_lookup_timeout_s,
            ttl_secs=config.remote_ttl_secs,
            start_up=up,
            list_interval_s=config.s3_list_interval_secs,
        )

    def store(self, config, geometry, rank: str, chunk_shape) -> Store | None:
        url = config.parsed_remote_url
        if not served(url):
            return None
        return RemoteStore(connect_remote(url, config), geometry.namespace.digest().hex(), rank, chunk_shape)
