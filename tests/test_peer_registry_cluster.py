"""The P2P lookup registry on a real Redis Cluster: holder sets, block entries and liveness keys
spread over the nodes, and every batch still one pipeline per node.

Slow by design (``tests/conftest.py``): a cluster takes seconds to form."""

from __future__ import annotations

import time

import pytest
import redis_servers as rs
from peer_support import NAMESPACE, make_chunk

from lmcache_connector.tiers.base import StoredChunk
from lmcache_connector.tiers.peer.addresses import InstanceId, PeerAddress
from lmcache_connector.tiers.peer.publisher import RegistryPublisher
from lmcache_connector.tiers.peer.registry import PeerRegistry, connect_registry
from lmcache_connector.tiers.remote.redis_client import RedisOptions
from lmcache_connector.urls import parse_redis_url


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory) -> rs.Cluster:
    with rs.cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


def test_the_registry_works_across_a_clusters_nodes(redis_cluster):
    options = RedisOptions(socket_timeout_secs=1, connect_timeout_secs=1)
    redis = connect_registry(parse_redis_url(f"redis-cluster://{redis_cluster.hosts}"), options)
    registry = PeerRegistry(redis, NAMESPACE, live_ttl_s=0.4, holder_ttl_s=30)
    a, b = (InstanceId.new(PeerAddress("127.0.0.1", port)) for port in (1, 2))
    chunks = [make_chunk() for _ in range(24)]  # enough keys to land on every node
    publisher = RegistryPublisher(registry, a).start()
    try:
        for chunk in chunks:
            publisher.publish(chunk.key, chunk.block_fps)
        registry.heartbeat(b)
        registry.publish(b, [StoredChunk(c.key, c.block_fps) for c in chunks[:12]])
        assert publisher.flush()
        nodes_used = {node.port for node in redis_cluster.nodes if node.admin().dbsize()}
        assert len(nodes_used) == len(redis_cluster.nodes)

        answers = registry.lookup([c.block_fps for c in chunks])
        assert [set(answers[c.key].holders) for c in chunks] == [{a, b}] * 12 + [{a}] * 12
        partial = chunks[0].block_fps[:2] + make_chunk(2).block_fps  # block-granular across nodes
        answers = registry.lookup([partial])
        assert [answers[fp] is not None for fp in partial] == [True, True, False, False]

        publisher.withdraw(chunks[0].key)
        assert publisher.flush()
        assert registry.lookup([chunks[0].block_fps])[chunks[0].key].holders == (b,)

        time.sleep(0.4 * 1.25 + 0.05)  # b stopped beating: no longer a holder, and pruned
        answers = registry.lookup([c.block_fps for c in chunks])
        assert answers[chunks[0].key] is None
        assert all(answers[c.key].holders == (a,) for c in chunks[1:])
    finally:
        publisher.close()
        registry.close()
