"""Sizes both halves of the connector derive from the same vLLM configuration.

The scheduler hands out memory-pool slots and the worker owns the pool, in different processes, so
both must compute the same slot count from the same inputs: ``VllmConfig`` and the
``KVCacheConfig`` each half receives (identical across workers except for layer names).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import LMCacheConfig, check_chunk_size
from ..keys import Namespace

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

logger = logging.getLogger("lmcache_connector")


@dataclass(frozen=True)
class Geometry:
    block_size: int
    blocks_per_chunk: int
    block_bytes: int  # one block of every layer, as vLLM sizes pages
    num_slots: int
    namespace: Namespace
    world_size: int  # workers that each hold a shard of every chunk

    @property
    def slot_bytes(self) -> int:
        return self.blocks_per_chunk * self.block_bytes


def model_identity(vllm_config: VllmConfig, config: LMCacheConfig) -> str:
    """The name in cache keys: LMCACHE_MODEL_NAME, else the served name, else the model vLLM was given."""
    if config.model_name:
        return config.model_name
    served = vllm_config.model_config.served_model_name
    if isinstance(served, (list, tuple)):
        served = served[0] if served else None
    return served or vllm_config.model_config.model


def compute_geometry(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, config: LMCacheConfig) -> Geometry:
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(
            f"lmcache_connector supports models with one KV-cache group; this model has {len(groups)} "
            "(hybrid attention). Run without --kv-transfer-config for this model."
        )
    spec = groups[0].kv_cache_spec
    block_size = spec.block_size
    check_chunk_size(config, block_size)
    num_layers = len(groups[0].layer_names)
    block_bytes = spec.page_size_bytes * num_layers
    blocks_per_chunk = config.chunk_size // block_size
    slot_bytes = blocks_per_chunk * block_bytes
    num_slots = config.max_local_cpu_bytes // slot_bytes if slot_bytes else 0

    parallel = vllm_config.parallel_config
    layout = kv_cache_config.kv_cache_layout or vllm_config.cache_config.kv_cache_layout or "unknown"
    namespace = Namespace(
        model=model_identity(vllm_config, config),
        kv_dtype=str(spec.dtype).removeprefix("torch."),
        kv_layout=str(layout),
        page_bytes=spec.page_size_bytes,
        num_layers=num_layers,
        block_size=block_size,
        chunk_size=config.chunk_size,
        tp_size=parallel.tensor_parallel_size,
        pp_size=parallel.pipeline_parallel_size,
    )
    return Geometry(
        block_size=block_size,
        blocks_per_chunk=blocks_per_chunk,
        block_bytes=block_bytes,
        num_slots=num_slots,
        namespace=namespace,
        world_size=parallel.world_size,
    )
