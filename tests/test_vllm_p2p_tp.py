"""Two vLLM engines with tensor parallelism (TP = 2, CPU build) share chunks peer to peer, rank to
rank, found through a real redis-server registry.

Each engine runs its two workers as processes (``distributed_executor_backend="mp"``), one per core
(``VLLM_CPU_OMP_THREADS_BIND="0|1"``: the CPU build refuses to bind two workers on one NUMA node by
itself). Each worker serves peers on ``LMCACHE_DISTRIBUTED_URL``'s port + its rank, and fetches its
shard from the same rank of the holder: a shard from the other rank fails its header check (the
rank is in it) and would be recomputed, so B's cached tokens and greedy output show every rank got
its own. The workers live in other processes than the engine's driver, so only what the scheduler
and the registry see is checked here; the counters per rank are proved in ``test_sim_peer.py``.
"""

from __future__ import annotations

import time

from peer_support import free_ports
from remote_engines import BLOCK, CHUNK, one
from vllm_support import assert_same_greedy, start_engine

from lmcache_connector.testing.tiny_model import TINY, random_prompt
from lmcache_connector.tiers.peer.registry import holders_key

TP = 2
BLOCKS_PER_CHUNK = CHUNK["chunk_size"] // BLOCK


def tp_engine(engine_tmp, redis):
    env = {
        "LMCACHE_ENABLE_P2P": "True",
        "LMCACHE_LOOKUP_URL": f"redis://127.0.0.1:{redis.port}",
        "LMCACHE_DISTRIBUTED_URL": f"127.0.0.1:{free_ports(TP)}",
        "LMCACHE_REMOTE_LOOKUP_TIMEOUT_MS": "300",
        "LMCACHE_BLOCKING_TIMEOUT_SECS": "5",
        "VLLM_CPU_OMP_THREADS_BIND": "0|1",
        "TMPDIR": str(engine_tmp),
    }
    return start_engine(
        TINY, engine_tmp, env=env, extra_config=CHUNK, tensor_parallel_size=TP, distributed_executor_backend="mp"
    )


def published(engine, redis, prompt) -> None:
    """Wait until the registry names a holder of each of ``prompt``'s chunks on ``engine``."""
    ids = engine.call("fingerprints", prompt=prompt)
    fps = ids["fingerprints"]
    keys = [fps[min(i + BLOCKS_PER_CHUNK, len(fps)) - 1] for i in range(0, len(fps), BLOCKS_PER_CHUNK)]
    names = [holders_key("lmc:", ids["namespace"], key) for key in keys]
    deadline = time.monotonic() + 30
    with redis.admin() as admin:
        while not all(admin.scard(name) for name in names):
            assert time.monotonic() < deadline, "the chunks were never published"
            engine.generate([[5, 6, 7]], max_tokens=1)  # a step: the workers report what they stored
            time.sleep(0.1)


def test_a_tp2_engine_fetches_each_ranks_shard_from_the_same_rank_of_another(engine_tmp, redis):
    prompt = random_prompt(600, seed=1)
    with tp_engine(engine_tmp, redis) as first:
        cold = one(first, prompt)
        published(first, redis, prompt)
        with tp_engine(engine_tmp, redis) as second:
            warm = one(second, prompt)
    assert warm["num_cached_tokens"] == 600 // BLOCK * BLOCK  # every rank's shard of every whole block
    assert_same_greedy(cold, warm)
