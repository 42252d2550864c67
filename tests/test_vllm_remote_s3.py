"""Two vLLM engine processes share one S3 bucket (a real moto_server on loopback): what one computed,
the other loads, block by block, with the same greedy output.

The engines run side by side, one core each, with ``LMCACHE_REMOTE_URL=s3://BUCKET/PREFIX`` and the
endpoint and credentials in the standard AWS variables, as an operator would set them. Outages and
bad values are the tier's business, the same for every store (``test_vllm_remote.py`` on Redis;
``test_s3_client.py`` for S3's own failures).
"""

from __future__ import annotations

import pytest
import s3_servers as ss
from vllm_support import assert_same_greedy, start_engine

from lmcache_connector.testing.tiny_model import TINY, random_prompt
from lmcache_connector.tiers.remote.client import value_key

CHUNK = {"chunk_size": 128}  # 4 blocks of 32 tokens: 64 KiB a chunk for this model
BLOCK = 32
BUCKET = "lmc-engines"
PREFIX = "team-a/cache"


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    with ss.moto_server(tmp_path_factory.mktemp("moto")) as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture(scope="module")
def pair(engine_tmp, moto):
    env = {
        **moto.env(),
        "LMCACHE_REMOTE_URL": f"s3://{BUCKET}/{PREFIX}",
        "LMCACHE_REMOTE_LOOKUP_TIMEOUT_MS": "1000",  # a loaded test machine; lookups never block anyway
        "LMCACHE_BLOCKING_TIMEOUT_SECS": "5",
    }
    first = start_engine(TINY, engine_tmp, env=env, extra_config=CHUNK, cpus={0})
    second = start_engine(TINY, engine_tmp, env=env, extra_config=CHUNK, cpus={1})
    yield first, second
    first.close()
    second.close()


def one(engine, prompt, max_tokens: int = 8) -> dict:
    return engine.generate([prompt], max_tokens=max_tokens, logprobs=5)[0]


def computed_and_shared(engine, prompt) -> dict:
    """Serve ``prompt`` on ``engine`` and wait until its chunks are in the bucket."""
    out = one(engine, prompt)
    engine.call("connector_state")  # flushes the remote writes and lets the engine hear of them
    return out


def remote_hits(engine) -> int:
    return engine.call("connector_state", settle=False)["totals"]["hit_tokens_by_tier"].get("remote", 0)


def test_a_second_engine_loads_what_the_first_computed_from_s3(pair, moto):
    first, second = pair
    prompt = random_prompt(600, seed=1)
    cold = computed_and_shared(first, prompt)
    assert all(name.startswith(f"{PREFIX}/lmc:") for name in moto.objects(BUCKET))
    before = remote_hits(second)
    warm = one(second, prompt)
    assert warm["num_cached_tokens"] == 600 // BLOCK * BLOCK  # every whole block, the partial chunk too
    assert remote_hits(second) - before == warm["num_cached_tokens"]
    assert_same_greedy(cold, warm)


def test_a_prompt_that_shares_part_of_a_chunk_reuses_every_shared_block(pair):
    first, second = pair
    document = random_prompt(500, seed=2)
    computed_and_shared(first, document)
    question = document[:300] + random_prompt(100, seed=3)  # diverges inside the third chunk
    warm = one(second, question)
    assert warm["num_cached_tokens"] == 300 // BLOCK * BLOCK
    assert_same_greedy(one(first, question), warm)


def test_a_chunk_a_lifecycle_rule_deleted_is_recomputed(pair, moto):
    first, second = pair
    prompt = random_prompt(384, seed=5)  # three whole chunks
    cold = computed_and_shared(first, prompt)
    ids = first.call("fingerprints", prompt=prompt)
    second_chunk = value_key("lmc:", ids["namespace"], "tp0pp0", ids["fingerprints"][7])
    moto.admin().delete_object(Bucket=BUCKET, Key=f"{PREFIX}/{second_chunk}")  # its entries stay
    warm = one(second, prompt)
    assert warm["num_cached_tokens"] == 128  # the first chunk only: the second is gone, so is the rest
    assert_same_greedy(cold, warm)
