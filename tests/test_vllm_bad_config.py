"""A bad setting stops the engine at start with a message that names it; nothing is served wrongly."""

from __future__ import annotations

import pytest
from vllm_support import start_engine

from lmcache_connector.testing.tiny_model import TINY
from lmcache_connector.testing.vllm_process import EngineError


@pytest.mark.parametrize(
    "env,extra,message",
    [
        ({"LMCACHE_CHUNK_SIZE": "lots"}, {}, "LMCACHE_CHUNK_SIZE='lots': expected a whole number"),
        ({}, {"chunk_size": 100}, "LMCACHE_CHUNK_SIZE=100: expected a multiple of vLLM's block size 32"),
    ],
)
def test_engine_start_fails_with_the_setting_named(engine_tmp, env, extra, message):
    with pytest.raises(EngineError) as err:
        start_engine(TINY, engine_tmp, env=env, extra_config=extra).close()
    assert message in str(err.value)
