"""Two vLLM engine processes share one S3 bucket (a real moto_server on loopback): what one computed,
the other loads, block by block, with the same greedy output.

The engines run side by side, one core each, with ``LMCACHE_REMOTE_URL=s3://BUCKET/PREFIX`` and the
endpoint and credentials in the standard AWS variables, as an operator would set them. Outages and
bad values are the tier's business, the same for every store (``test_vllm_remote.py`` on Redis;
``test_s3_client.py`` for S3's own failures).
"""

from __future__ import annotations

import pytest
import remote_engines as proofs
import s3_servers as ss
from remote_engines import computed_and_shared, engine_pair, one, remote_env
from vllm_support import assert_same_greedy

from lmcache_connector.testing.tiny_model import random_prompt
from lmcache_connector.tiers.remote.client import value_key

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
        **remote_env(f"s3://{BUCKET}/{PREFIX}"),
        "LMCACHE_REMOTE_LOOKUP_TIMEOUT_MS": "1000",  # a loaded test machine; lookups never block anyway
        "LMCACHE_BLOCKING_TIMEOUT_SECS": "5",
    }
    with engine_pair(engine_tmp, env) as engines:
        yield engines


def test_a_second_engine_loads_what_the_first_computed_from_s3(pair, moto):
    proofs.second_engine_loads_what_the_first_computed(*pair)
    assert all(name.startswith(f"{PREFIX}/lmc:") for name in moto.objects(BUCKET))


def test_a_prompt_that_shares_part_of_a_chunk_reuses_every_shared_block(pair):
    proofs.a_prompt_sharing_part_of_a_chunk_reuses_every_shared_block(*pair)


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
