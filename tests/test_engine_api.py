"""The engine API (``lmcache_connector.engine.KVCache``) in one process, on random KV: what a custom
engine stores comes back byte for byte, from memory and from a new cache on the same disk folder;
wrong input is an error naming what was expected; a miss or a corrupt file is ``None``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from engine_api_support import (
    CHUNK,
    HEAD_SIZE,
    HEADS,
    LAYERS,
    env,
    prefix_of,
    random_cache,
    random_kv,
    same_kv,
    tiny_f32_model,
    tokens,
)

from lmcache_connector.config import ConfigError
from lmcache_connector.engine import BLOCK_SIZE, LAYOUT_TAG, KVCache
from lmcache_connector.keys import block_fingerprints, request_root

torch.set_num_threads(1)


def test_store_then_retrieve_gives_back_the_same_kv():
    prompt, kv = tokens(150), random_kv(150)  # two whole chunks, one block of a third, 6 tokens more
    with random_cache(env()) as cache:
        assert cache.lookup(prompt) == 0
        assert cache.retrieve(prompt) is None
        assert cache.store(prompt, kv) == 144
        assert cache.store(prompt, kv) == 0  # every chunk is held already
        assert cache.lookup(prompt) == 144
        n, got = cache.retrieve(prompt)
        assert n == 144 and same_kv(got, prefix_of(kv, 144))
        assert cache.state()["planner"]["pins"] == 0


def test_three_dimensional_kv_and_token_tensors_are_accepted():
    prompt, kv = tokens(64), random_kv(64)
    with random_cache(env()) as cache:
        assert cache.store(torch.tensor([prompt]), [(k[0], v[0]) for k, v in kv]) == 64
        n, got = cache.retrieve(torch.tensor(prompt))
        assert n == 64 and same_kv(got, kv)


def test_a_dynamic_cache_goes_in_and_comes_out():
    from transformers import DynamicCache

    prompt, kv = tokens(96), random_kv(96)
    with random_cache(env()) as cache:
        assert cache.store(prompt, DynamicCache(ddp_cache_data=kv)) == 96
        n, got = cache.retrieve(prompt, as_cache=True)
        assert isinstance(got, DynamicCache) and n == 96 and got.get_seq_length() == 96
        assert same_kv([(layer.keys, layer.values) for layer in got.layers], kv)


def test_retrieve_writes_into_caller_buffers():
    prompt, kv = tokens(100), random_kv(100)
    out = [(torch.zeros(1, HEADS, 128, HEAD_SIZE), torch.zeros(1, HEADS, 128, HEAD_SIZE)) for _ in range(LAYERS)]
    with random_cache(env()) as cache:
        cache.store(prompt, kv)
        n, got = cache.retrieve(prompt, out=out)
        assert n == 96 and got is out
        assert same_kv(prefix_of(out, 96), prefix_of(kv, 96))
        assert all(not t[:, :, 96:].any() for pair in out for t in pair)  # nothing past the prefix
        with pytest.raises(ValueError, match="out layer 0 K holds 64 tokens: it needs room for all 100"):
            cache.retrieve(prompt, out=prefix_of(out, 64))


def test_a_longer_prompt_retrieves_exactly_the_shared_blocks():
    prompt, kv = tokens(150), random_kv(150)
    with random_cache(env()) as cache:
        cache.store(prompt, kv)
        shares_two_chunks = prompt[:128] + tokens(200, seed=1)
        n, got = cache.retrieve(shares_two_chunks)
        assert n == 128 and same_kv(got, prefix_of(kv, 128))
        diverges_in_a_block = prompt[:100] + tokens(100, seed=2)  # blocks 0..5 shared, block 6 not
        assert cache.lookup(diverges_in_a_block) == 96
        assert cache.lookup(prompt + tokens(300, seed=3)) == 144  # the stored partial chunk's block too
        assert cache.lookup(tokens(150, seed=4)) == 0


def test_without_unfull_chunks_only_whole_chunks_are_stored():
    prompt, kv = tokens(150), random_kv(150)
    with random_cache(env(save_unfull_chunk="False")) as cache:
        assert cache.store(prompt, kv) == 128
        assert cache.lookup(prompt) == 128


@pytest.mark.parametrize(
    "kv, message",
    [
        (random_kv(50)[:1], "kv has 1 layers; this cache was built for num_layers=2"),
        (random_kv(40), "kv layer 0 K holds 40 tokens, but 50 tokens were given"),
        (random_kv(50, dtype=torch.float16), "kv layer 0 K is torch.float16, but this cache stores torch.float32"),
        (
            [(torch.zeros(1, 3, 50, HEAD_SIZE), torch.zeros(1, 3, 50, HEAD_SIZE))] * LAYERS,
            r"kv layer 0 K has shape \(3, 50, 8\): expected \[1, num_kv_heads=2, num_tokens, head_size=8\]",
        ),
        (
            [(torch.zeros(2, HEADS, 50, HEAD_SIZE), torch.zeros(2, HEADS, 50, HEAD_SIZE))] * LAYERS,
            "kv layer 0 K has batch size 2: one sequence per call",
        ),
        ([(torch.zeros(1, HEADS, 50, HEAD_SIZE),)] * LAYERS, r"kv layer 0: expected a \(K, V\) pair"),
        ("not a cache", "kv is a str: expected a DynamicCache or a sequence of"),
    ],
    ids=["layers", "length", "dtype", "heads", "batch", "pair", "type"],
)
def test_store_refuses_wrong_input_naming_what_was_expected(kv, message):
    with random_cache(env()) as cache:
        with pytest.raises(ValueError, match=message):
            cache.store(tokens(50), kv)
        assert cache.lookup(tokens(50)) == 0


def test_tokens_must_be_one_sequence_of_ints():
    with random_cache(env()) as cache:
        with pytest.raises(ValueError, match="batch of 2 sequences"):
            cache.lookup(torch.zeros(2, 16, dtype=torch.long))
        with pytest.raises(ValueError, match="expected token ids"):
            cache.lookup([1.5, 2.0])


def test_a_chunk_size_that_is_not_whole_blocks_is_refused():
    with pytest.raises(
        ConfigError, match=f"LMCACHE_CHUNK_SIZE=100: expected a multiple of the engine API's block size {BLOCK_SIZE}"
    ):
        random_cache(env(chunk_size="100"))


def test_the_block_buffer_grows_for_long_prompts():
    prompt, kv = tokens(40 * BLOCK_SIZE), random_kv(40 * BLOCK_SIZE)  # ten chunks; the buffer starts at one
    with random_cache(env()) as cache:
        assert cache.store(prompt, kv) == len(prompt)
        n, got = cache.retrieve(prompt)
        assert n == len(prompt) and same_kv(got, kv)


@pytest.mark.parametrize("async_fills", ["False", "True"], ids=["fill-on-the-caller", "background-fill"])
def test_a_new_cache_on_the_same_disk_folder_retrieves_what_the_first_stored(tmp_path, async_fills):
    prompt, kv = tokens(150), random_kv(150)
    settings = env(tmp_path, disk=True, disk_async_fills=async_fills)
    with random_cache(settings) as first:
        first.store(prompt, kv)
    with random_cache(settings) as second:  # empty memory tier: every chunk comes from disk
        assert second.lookup(prompt) == 144
        n, got = second.retrieve(prompt)
        assert n == 144 and same_kv(got, prefix_of(kv, 144))
        assert second.state()["planner"]["totals"]["hit_tokens_by_tier"] == {"disk": 144}


def test_a_corrupt_disk_file_is_a_miss(tmp_path):
    prompt, kv = tokens(64), random_kv(64)
    settings = env(tmp_path, disk=True)
    with random_cache(settings) as first:
        first.store(prompt, kv)
    (chunk_file,) = Path(settings["LMCACHE_LOCAL_DISK"]).glob("*.lmc.safetensors")
    data = bytearray(chunk_file.read_bytes())
    data[-1] ^= 0xFF  # one bit of the KV bytes: the checksum no longer matches
    chunk_file.write_bytes(bytes(data))
    with random_cache(settings) as second:
        assert second.lookup(prompt) == 64  # the catalog knows the file; only reading it finds the damage
        assert second.retrieve(prompt) is None
        assert second.lookup(prompt) == 0


@pytest.mark.parametrize("async_fills", ["False", "True"], ids=["fill-on-the-caller", "background-fill"])
def test_a_corrupt_chunk_in_the_middle_ends_the_prefix_before_it(tmp_path, async_fills):
    prompt, kv = tokens(3 * CHUNK), random_kv(3 * CHUNK)
    settings = env(tmp_path, disk=True, disk_async_fills=async_fills)
    with random_cache(settings) as first:
        first.store(prompt, kv)
        namespace = first.geometry.namespace.digest()
    second_chunk_key = block_fingerprints(request_root(namespace), prompt, BLOCK_SIZE)[2 * CHUNK // BLOCK_SIZE - 1]
    (victim,) = Path(settings["LMCACHE_LOCAL_DISK"]).glob(f"*-{second_chunk_key.hex()}.lmc.safetensors")
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with random_cache(settings) as second:
        assert second.lookup(prompt) == 3 * CHUNK
        n, got = second.retrieve(prompt)
        assert n == CHUNK and same_kv(got, prefix_of(kv, CHUNK))  # the first chunk only, never the bad bytes


def test_close_writes_every_chunk_to_disk(tmp_path):
    settings = env(tmp_path, disk=True)
    cache = random_cache(settings)
    cache.store(tokens(40 * BLOCK_SIZE), random_kv(40 * BLOCK_SIZE))
    cache.close()
    cache.close()  # idempotent
    assert len(list(Path(settings["LMCACHE_LOCAL_DISK"]).glob("*.lmc.safetensors"))) == 40 * BLOCK_SIZE // CHUNK
    with pytest.raises(RuntimeError, match="closed"):
        cache.lookup(tokens(16))


def test_different_models_and_dtypes_never_share_chunks():
    prompt, kv = tokens(64), random_kv(64)
    settings = env()
    with random_cache(settings, model="model-a") as a, random_cache(settings, model="model-b") as b:
        a.store(prompt, kv)
        assert a.geometry.namespace.digest() != b.geometry.namespace.digest()
    with random_cache(settings, dtype=torch.bfloat16) as bf16:
        assert bf16.geometry.namespace != a.geometry.namespace
    named = env(model_name="shared-name")
    with random_cache(named, model="model-a") as a, random_cache(named, model="model-b") as b:
        assert a.geometry.namespace.digest() == b.geometry.namespace.digest()  # LMCACHE_MODEL_NAME vouches


def test_for_model_reads_the_shape_from_a_transformers_model():
    from transformers import AutoConfig

    folder = tiny_f32_model()
    config = AutoConfig.from_pretrained(folder)
    with KVCache.for_model(config, env=env()) as cache:
        assert (cache.shape.num_layers, cache.shape.num_kv_heads, cache.shape.head_size) == (2, 2, 32)
        assert cache.shape.dtype == torch.float32
        assert cache.geometry.namespace.model == str(folder)
        assert cache.geometry.namespace.checkpoint.startswith("revision=;files:")
        assert cache.geometry.namespace.kv_layout == LAYOUT_TAG
    config.name_or_path = ""
    with pytest.raises(ValueError, match="model='': name the weights"):
        KVCache.for_model(config, env=env())
    config.sliding_window, config.use_sliding_window = 64, True
    with pytest.raises(ValueError, match="full-attention models only"):
        KVCache.for_model(config, env=env(), model="x")


def test_chunks_stored_through_the_api_never_match_vllms_for_the_same_model():
    """Same weights, dtype, block size, chunk size and bytes per block: only the layout tag differs,
    and it alone keeps the two apart (the API and vLLM lay a block's bytes out differently)."""
    from vllm.config import CacheConfig, ModelConfig, VllmConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    from lmcache_connector.config import load_config
    from lmcache_connector.connector.vllm_config import compute_geometry

    folder = tiny_f32_model()
    vllm = VllmConfig(
        model_config=ModelConfig(model=str(folder), dtype="float32", max_model_len=512, skip_tokenizer_init=True),
        cache_config=CacheConfig(block_size=BLOCK_SIZE),
    )
    vllm.cache_config.kv_cache_layout = "LBHNC"
    spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=2, head_size=32, dtype=torch.float32)
    layers = [f"model.layers.{i}.self_attn.attn" for i in range(2)]
    groups = [KVCacheGroupSpec(layers, spec)]
    ours_in_vllm = compute_geometry(vllm, KVCacheConfig(64, [], groups), load_config(env(), {})).namespace
    with KVCache.for_model(vllm.model_config.hf_config, env=env()) as cache:
        ours_in_api = cache.geometry.namespace
    assert dataclasses.replace(ours_in_api, kv_layout=ours_in_vllm.kv_layout) == ours_in_vllm
    assert ours_in_api.digest() != ours_in_vllm.digest()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("buffer_device", ["cpu", "cuda"])
def test_kv_on_a_gpu_goes_in_and_comes_back_on_the_gpu(tmp_path, buffer_device):
    prompt, kv = tokens(150), [(k.cuda(), v.cuda()) for k, v in random_kv(150)]
    settings = env(tmp_path, disk=True)
    with random_cache(settings, device=buffer_device) as cache:
        assert cache.store(prompt, kv) == 144
        n, got = cache.retrieve(prompt, device="cuda")
        assert n == 144 and got[0][0].is_cuda and same_kv(got, prefix_of(kv, 144))
    with random_cache(settings, device=buffer_device) as fresh:  # every chunk from disk
        n, got = fresh.retrieve(prompt, device="cuda")
        assert n == 144 and same_kv(got, prefix_of(kv, 144))
