"""The key namespace names the weights and the KV format that made the bytes, and configurations that
would put KV into the wrong blocks are refused at start. Real ``VllmConfig`` objects on a locally
built model, hand-built ``KVCacheConfig``s as vLLM would hand them over; no engine."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, ParallelConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.lora.request import LoRARequest
from vllm.v1.core.kv_cache_utils import generate_scheduler_kv_cache_config, get_kv_cache_configs
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, SlidingWindowSpec
from vllm_support import MODEL_ROOT

from lmcache_connector import LMCacheConnector
from lmcache_connector.config import load_config
from lmcache_connector.connector.vllm_config import compute_geometry
from lmcache_connector.identity import checkpoint_fingerprint, lora_identity
from lmcache_connector.testing.tiny_model import SMALL_MHA, TINY, build_model
from lmcache_connector.testing.vllm_process import CONNECTOR

STORAGE_DTYPE = {"auto": torch.bfloat16, "bfloat16": torch.bfloat16}  # every quantized format: uint8


@pytest.fixture(scope="module")
def tiny_folder():
    return build_model(TINY, MODEL_ROOT)


@pytest.fixture
def own_copy(tiny_folder, tmp_path):
    """A copy of the tiny model this test may overwrite (the shared one stays as it is)."""
    return shutil.copytree(tiny_folder, tmp_path / "model")


def vllm_config(model, cache_dtype="auto", served_model_name=None, **parallel) -> VllmConfig:
    config = VllmConfig(
        model_config=ModelConfig(
            model=str(model),
            dtype="bfloat16",
            max_model_len=512,
            skip_tokenizer_init=True,
            served_model_name=served_model_name,
        ),
        cache_config=CacheConfig(block_size=32, cache_dtype=cache_dtype),
        parallel_config=ParallelConfig(**parallel),
        kv_transfer_config=KVTransferConfig(**CONNECTOR),
    )
    config.cache_config.kv_cache_layout = "LBHNC"  # what the engine core resolves on the CPU build
    return config


def attention_spec(cache_dtype="auto", spec_cls=FullAttentionSpec, **extra):
    dtype = STORAGE_DTYPE.get(cache_dtype, torch.uint8)
    return spec_cls(block_size=32, num_kv_heads=2, head_size=32, dtype=dtype, **extra)


def kv_cache_config(spec, num_layers=2) -> KVCacheConfig:
    layers = [f"model.layers.{i}.self_attn.attn" for i in range(num_layers)]
    return KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(layers, spec)])


def namespace(model, cache_dtype="auto", env=None, **kwargs):
    config = vllm_config(model, cache_dtype, **kwargs)
    geometry = compute_geometry(config, kv_cache_config(attention_spec(cache_dtype)), load_config(env or {}, {}))
    return geometry.namespace


# ---------------------------------------------------------------- the KV format


def test_each_fp8_format_has_its_own_namespace(tiny_folder):
    spaces = {dtype: namespace(tiny_folder, dtype) for dtype in ("auto", "fp8_e4m3", "fp8_e5m2")}
    assert len({ns.digest() for ns in spaces.values()}) == 3
    assert (spaces["fp8_e4m3"].page_bytes, spaces["fp8_e4m3"].kv_dtype) == (spaces["fp8_e5m2"].page_bytes, "fp8_e4m3")
    assert spaces["fp8_e5m2"].kv_dtype == "fp8_e5m2"


def test_fp8_is_an_alias_of_fp8_e4m3(tiny_folder):
    # vLLM's "fp8" is e4m3 on CUDA, ROCm and CPU (the CPU kernel writes the same bytes for both).
    assert namespace(tiny_folder, "fp8").digest() == namespace(tiny_folder, "fp8_e4m3").digest()


def test_explicit_bfloat16_is_the_same_bytes_as_auto_on_a_bf16_model(tiny_folder):
    assert namespace(tiny_folder, "bfloat16").digest() == namespace(tiny_folder, "auto").digest()


# ---------------------------------------------------------------- the weights


def test_another_checkpoint_under_the_same_served_name_gets_another_namespace(tiny_folder, own_copy):
    a = namespace(tiny_folder, served_model_name="default")
    b = namespace(own_copy, served_model_name="default")
    assert a.digest() != b.digest()
    assert b.model == str(own_copy)  # the model vLLM was given, never the alias


def test_a_checkpoint_rewritten_in_place_gets_another_namespace(own_copy):
    before = namespace(own_copy)
    assert namespace(own_copy).digest() == before.digest()  # stable while nothing changes
    weights = own_copy / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # same size, rewritten later
    touched = namespace(own_copy)
    assert touched.digest() != before.digest()
    with open(weights, "ab") as f:  # a different size, whatever the clock says
        f.write(b"\0" * 8)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert namespace(own_copy).digest() not in {before.digest(), touched.digest()}


def test_a_new_config_json_gets_another_namespace(own_copy):
    before = namespace(own_copy).digest()
    config = own_copy / "config.json"
    stat = config.stat()
    config.write_text(config.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old time stamp
    assert namespace(own_copy).digest() != before


def test_a_hub_model_is_identified_by_its_cached_snapshot_commit(tmp_path):
    repo = tmp_path / "models--acme--tiny"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert checkpoint_fingerprint("acme/tiny", None, str(tmp_path)) == "hub:" + "a" * 40
    (repo / "refs" / "main").write_text("b" * 40)  # main moved on: other weights
    assert checkpoint_fingerprint("acme/tiny", "main", str(tmp_path)) == "hub:" + "b" * 40
    assert checkpoint_fingerprint("acme/other", None, str(tmp_path)) == ""  # not downloaded: name and revision only


def test_lmcache_model_name_makes_two_paths_share_keys(tiny_folder, own_copy):
    env = {"LMCACHE_MODEL_NAME": "llama-tiny"}
    a, b = namespace(tiny_folder, env=env), namespace(own_copy, env=env)
    assert a.digest() == b.digest()
    assert (a.model, a.checkpoint) == ("llama-tiny", "")


def test_a_lora_adapter_is_identified_by_its_path_and_files(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text('{"r": 8}')
        (tmp_path / name / "adapter_model.safetensors").write_bytes(b"\1" * 64)
    first = lora_identity(LoRARequest("support-bot", 1, str(tmp_path / "a")))
    other_path = lora_identity(LoRARequest("support-bot", 1, str(tmp_path / "b")))
    assert first != other_path
    assert lora_identity(LoRARequest("support-bot", 7, str(tmp_path / "a"))) == first  # the int id is per engine
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"\2" * 80)  # retrained in place
    assert lora_identity(LoRARequest("support-bot", 1, str(tmp_path / "a"))) != first
    assert lora_identity(None) is None


# ---------------------------------------------------------------- refused configurations


def connector(config, role, kv_config, rank=(0, 0)):
    return LMCacheConnector(config, role, kv_config, worker_rank=rank)


def refusal(config, kv_config) -> str:
    with pytest.raises(ValueError) as err:
        connector(config, KVConnectorRole.SCHEDULER, kv_config)
    return str(err.value)


def test_decode_context_parallel_is_refused(tiny_folder):
    # DCP needs more TP ranks than KV heads (2 here); the config is only built, never run.
    config = vllm_config(tiny_folder, tensor_parallel_size=4, decode_context_parallel_size=2)
    message = refusal(config, kv_cache_config(attention_spec()))
    assert "decode_context_parallel_size=2 (--decode-context-parallel-size)" in message
    assert "block_size x 2 tokens" in message


def test_prefill_context_parallel_is_refused(tiny_folder):
    config = vllm_config(tiny_folder)
    # vLLM 0.32 accepts PCP only with the V2 model runner, which needs Triton: not on the CPU build,
    # so the setting is applied to a config that was built without it.
    config.parallel_config.prefill_context_parallel_size = 2
    message = refusal(config, kv_cache_config(attention_spec()))
    assert "prefill_context_parallel_size=2 (--prefill-context-parallel-size)" in message


def test_a_sliding_window_only_model_is_refused(tiny_folder):
    spec = attention_spec(spec_cls=SlidingWindowSpec, sliding_window=64)
    message = refusal(vllm_config(tiny_folder), kv_cache_config(spec))
    assert "sliding-window-only model (sliding_window=64)" in message


def pipeline_kv_cache_configs(config, model_layers):
    """The KV-cache configs vLLM's engine core builds under pipeline parallelism: one per stage (its
    own layers only) and the scheduler's (the first stage's)."""
    from vllm.distributed.utils import get_pp_indices

    pp = config.parallel_config.pipeline_parallel_size
    specs = []
    for rank in range(pp):
        start, end = get_pp_indices(model_layers, rank, pp)
        specs.append({f"model.layers.{i}.self_attn.attn": attention_spec() for i in range(start, end)})
    stages = get_kv_cache_configs(config, specs, [64 * 2**20] * pp)
    return stages, generate_scheduler_kv_cache_config(stages)


def test_an_uneven_pipeline_split_is_refused():
    model = build_model(SMALL_MHA, MODEL_ROOT)  # 3 layers: stages of 2 and 1
    config = vllm_config(model, pipeline_parallel_size=2)
    stages, scheduler_config = pipeline_kv_cache_configs(config, 3)
    assert [len(s.kv_cache_groups[0].layer_names) for s in stages] == [2, 1]
    message = refusal(config, scheduler_config)
    assert "pipeline_parallel_size=2 splits the model's 3 layers unevenly ([2, 1] per stage" in message
    assert "VLLM_PP_LAYER_PARTITION" in message
    with pytest.raises(ValueError, match="unevenly"):
        connector(config, KVConnectorRole.WORKER, stages[1], rank=(0, 1))


def test_an_even_pipeline_split_gives_every_stage_the_scheduler_geometry(tiny_folder):
    config = vllm_config(tiny_folder, pipeline_parallel_size=2)
    stages, scheduler_config = pipeline_kv_cache_configs(config, 2)
    extra = {"max_local_cpu_size": 0.01}
    config.kv_transfer_config.kv_connector_extra_config = extra
    halves = [connector(config, KVConnectorRole.SCHEDULER, scheduler_config)]
    halves += [connector(config, KVConnectorRole.WORKER, stage, rank=(0, r)) for r, stage in enumerate(stages)]
    geometries = {h.geometry for h in halves}
    assert len(geometries) == 1, geometries
    (geometry,) = geometries
    assert (geometry.namespace.num_layers, geometry.namespace.pp_size, geometry.world_size) == (1, 2, 2)
    for half in halves:
        half.shutdown()
