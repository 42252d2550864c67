"""Building the simulated engine: a real ``VllmConfig`` on CPU, vLLM's real ``Scheduler`` (which
builds the SCHEDULER-role connector itself), and one WORKER-role connector per tensor-parallel rank
with KV tensors allocated the way vLLM's model runner allocates them.

No model hub and no weights: vLLM's ``ModelConfig`` needs only an HF ``config.json`` (a tiny Llama
written into the test's folder) with ``skip_tokenizer_init``. The connector is configured through
``kv_connector_extra_config`` only (tests clear ``LMCACHE_*`` variables with
:func:`clear_lmcache_env`); the memory tier is sized in chunks so evictions are easy to arrange.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

GB = 1024**3
LAYOUT = "LBNHC"  # vLLM's default preference; the connector copies every layout as bytes alike
DISK_FILE_OVERHEAD = 2048  # a chunk file's header, generously


@dataclass
class SimConfig:
    block_size: int = 16
    chunk_size: int = 32
    num_blocks: int = 64  # vLLM's KV cache, per rank (one is vLLM's null block)
    max_num_batched_tokens: int = 128
    max_num_seqs: int = 8
    max_model_len: int = 1024
    prefix_caching: bool = True
    tp: int = 1
    num_layers: int = 2
    num_kv_heads: int = 2  # all ranks together
    head_size: int = 4
    memory_chunks: int = 8  # slots of the memory tier
    disk: bool = False
    disk_chunks: int = 64  # chunk files per rank the disk bound holds
    load_failure_policy: str = "recompute"
    enable_prompt_embeds: bool = False
    disk_async_fills: bool | str = False  # the disk tier's fills on the model thread unless a test asks otherwise
    kv_events: bool = False  # vLLM's KV-cache events on (published to the Sim's list, not over ZMQ)
    hash_algo: str = "sha256"  # --prefix-caching-hash-algo
    extra_config: dict[str, Any] = field(default_factory=dict)

    @property
    def token_bytes(self) -> int:
        """Bytes of one position in one layer on one rank (float16 K|V of the rank's heads)."""
        return (self.num_kv_heads // self.tp) * 2 * self.head_size * 2

    @property
    def slot_bytes(self) -> int:
        return self.chunk_size * self.token_bytes * self.num_layers

    def connector_extra_config(self, disk_dir: Path) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "chunk_size": self.chunk_size,
            "max_local_cpu_size": (self.memory_chunks + 0.5) * self.slot_bytes / GB,
            "load_failure_policy": self.load_failure_policy,
            "disk_rescan_interval_secs": 3600,  # rescans run in the background: keep runs deterministic
            "model_name": "sim-llama",  # one cache namespace for every Sim sharing a disk folder
            "disk_async_fills": self.disk_async_fills,
        }
        if self.disk:
            extra["local_disk"] = str(disk_dir)
            extra["max_local_disk_size"] = self.tp * self.disk_chunks * (self.slot_bytes + DISK_FILE_OVERHEAD) / GB
        extra.update(self.extra_config)
        return extra


def clear_lmcache_env(monkeypatch) -> None:
    """The simulation configures the connector through extra_config only."""
    for name in [n for n in os.environ if n.startswith("LMCACHE_")]:
        monkeypatch.delenv(name)


def write_model_config(folder: Path, cfg: SimConfig) -> Path:
    """An HF ``config.json`` of a tiny Llama: all ``ModelConfig`` needs with ``skip_tokenizer_init``."""
    folder.mkdir(parents=True, exist_ok=True)
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_size,
        "intermediate_size": 128,
        "vocab_size": 1000,
        "max_position_embeddings": 4096,
        "torch_dtype": "float16",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(hf))
    return folder


def build_configs(cfg: SimConfig, root: Path, disk_dir: Path):
    """``(VllmConfig, KVCacheConfig)`` of the simulated engine: one full-attention group, ``LBNHC``."""
    from vllm.config import (
        CacheConfig,
        DeviceConfig,
        KVEventsConfig,
        KVTransferConfig,
        ModelConfig,
        ParallelConfig,
        SchedulerConfig,
        VllmConfig,
    )
    from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec

    model = ModelConfig(
        model=str(write_model_config(root / "sim-model", cfg)),
        skip_tokenizer_init=True,
        dtype="float16",
        max_model_len=cfg.max_model_len,
        seed=0,
        enable_prompt_embeds=cfg.enable_prompt_embeds,
    )
    cache = CacheConfig(
        block_size=cfg.block_size, enable_prefix_caching=cfg.prefix_caching, prefix_caching_hash_algo=cfg.hash_algo
    )
    cache.num_gpu_blocks_override = cfg.num_blocks
    vllm_config = VllmConfig(
        model_config=model,
        cache_config=cache,
        scheduler_config=SchedulerConfig(
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_num_seqs=cfg.max_num_seqs,
            max_model_len=cfg.max_model_len,
            is_encoder_decoder=False,
        ),
        parallel_config=ParallelConfig(tensor_parallel_size=cfg.tp),
        device_config=DeviceConfig("cpu"),
        kv_transfer_config=KVTransferConfig(
            kv_connector="LMCacheConnector",
            kv_connector_module_path="lmcache_connector",
            kv_role="kv_both",
            kv_connector_extra_config=cfg.connector_extra_config(disk_dir),
        ),
        kv_events_config=KVEventsConfig(enable_kv_cache_events=True, publisher="null") if cfg.kv_events else None,
    )
    # The engine core resolves the layout before connectors are built; do the same.
    vllm_config.cache_config.kv_cache_layout = LAYOUT
    spec = FullAttentionSpec(
        block_size=cfg.block_size,
        num_kv_heads=cfg.num_kv_heads // cfg.tp,
        head_size=cfg.head_size,
        dtype=torch.float16,
    )
    layers = [f"model.layers.{i}.self_attn.attn" for i in range(cfg.num_layers)]
    kv_cache_config = get_kv_cache_config_from_groups(
        vllm_config, [KVCacheGroupSpec(layers, spec)], available_memory=1 << 40
    )
    kv_cache_config.kv_cache_layout = LAYOUT
    vllm_config.cache_config.num_gpu_blocks = kv_cache_config.num_blocks
    return vllm_config, kv_cache_config


def build_scheduler(vllm_config, kv_cache_config, block_size: int):
    """vLLM's scheduler (its connector is ``scheduler.connector``) and the request block hasher the
    engine core would attach to every request."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager

    scheduler = Scheduler(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=block_size,
        log_stats=True,
    )
    hash_fn = get_hash_fn_by_name(vllm_config.cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    return scheduler, get_request_block_hasher(block_size, hash_fn)


def build_worker(vllm_config, kv_cache_config, rank: int, tp: int):
    """One rank's WORKER-role connector, registered with that rank's own KV tensors; returns it and
    the rank's whole KV cache as a flat uint8 array (the views' one backing allocation)."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.kv_cache_layout import KVCacheLayout
    from vllm.v1.worker.utils import allocate_kv_cache

    from lmcache_connector import LMCacheConnector

    kwargs = {}
    if tp > 1 or "worker_rank" in inspect.signature(LMCacheConnector.__init__).parameters:
        kwargs["worker_rank"] = (rank, 0)  # (tp_rank, pp_rank): the worker half names its shard with it
    worker = LMCacheConnector(vllm_config, KVConnectorRole.WORKER, kv_cache_config, **kwargs)
    views = allocate_kv_cache(kv_cache_config, torch.device("cpu"), KVCacheLayout[LAYOUT])
    worker.register_kv_caches(views)
    first = next(iter(views.values()))
    flat = torch.empty(0, dtype=torch.uint8).set_(first.untyped_storage())
    storage: np.ndarray = flat.numpy()
    return worker, storage
