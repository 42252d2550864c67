"""The peer tier behind the tier contract: instances share chunks from each other's memory and disk.

Enabled by ``LMCACHE_ENABLE_P2P=True`` with ``LMCACHE_LOOKUP_URL`` (the Redis registry, any Redis
form of the remote tier, with the ``LMCACHE_REMOTE_*`` password, TLS and key-prefix settings) and
``LMCACHE_DISTRIBUTED_URL`` (``HOST:PORT``: the worker of rank *r* serves on PORT + *r*; a wildcard
host needs ``LMCACHE_P2P_ADVERTISE_HOST``). The configuration checks these at start
(:mod:`lmcache_connector.config`).

The scheduler builds a :class:`~.catalog.PeerCatalog` (the registry view and the publisher, under a
fresh :class:`~.addresses.InstanceId`); each worker rank a :class:`~.store.PeerStore` (its server
and its client). In the lookup chain the tier comes after disk and before the remote store (order
20). As with the remote tier, registry credentials that Redis refuses stop the engine with a
message; a registry that does not answer is one warning, and the tier starts *down* until a
background probe reaches it.
"""

from __future__ import annotations

import logging
import re

from lmcache_connector.tiers.base import Catalog, Medium, Store
from lmcache_connector.tiers.peer.addresses import InstanceId, advertised_address, bind_address, worker_rank
from lmcache_connector.tiers.peer.catalog import PeerCatalog
from lmcache_connector.tiers.peer.client import PeerClient
from lmcache_connector.tiers.peer.publisher import RegistryPublisher
from lmcache_connector.tiers.peer.registry import PeerRegistry, connect_registry, registry_options
from lmcache_connector.tiers.peer.store import PeerStore
from lmcache_connector.tiers.peer.view import PeerView
from lmcache_connector.tiers.remote.client import answers_at_start

logger = logging.getLogger("lmcache_connector")

_RANK_TAG = re.compile(r"tp(\d+)pp(\d+)")


class PeerMedium(Medium):
    name = "peer"

    def catalog(self, config, geometry) -> Catalog | None:
        if not config.enable_p2p:
            return None
        namespace_hex = geometry.namespace.digest().hex()
        redis = connect_registry(config.parsed_lookup_url, registry_options(config))
        registry = PeerRegistry(redis, namespace_hex, key_prefix=config.remote_key_prefix)
        up = answers_at_start("the P2P lookup registry", redis.url, registry.ping, registry.close, "without peers")
        own = InstanceId.new(advertised_address(config.distributed_url, config.p2p_advertise_host))
        view = PeerView(registry, own, lookup_timeout_s=config.remote_lookup_timeout_s, start_up=up)
        publisher = RegistryPublisher(registry, own).start()
        logger.info("lmcache_connector: peer tier on, this instance is %s in the registry %s", own, redis.url)
        return PeerCatalog(view, publisher)

    def store(self, config, geometry, rank: str, chunk_shape) -> Store | None:
        if not config.enable_p2p:
            return None
        tp_rank, pp_rank = (int(n) for n in _RANK_TAG.fullmatch(rank).groups())
        ns = geometry.namespace
        rank_index = worker_rank(tp_rank, ns.tp_size, pp_rank)
        token = config.p2p_token()
        client = PeerClient(ns.digest().hex(), tp_rank, pp_rank, token=token)
        bind = bind_address(config.distributed_url, rank_index)
        return PeerStore(client, rank_index, bind, chunk_shape, config.blocking_timeout_secs, token=token)
