"""All the engine API knows of Hugging Face ``transformers``, which is imported only here, lazily.

* :func:`model_shape` reads what keys and sizes the cache (layers, KV heads, head size, dtype, the
  model's name or path) from a model or its config, and refuses models whose KV this API cannot
  hold as one full-attention sequence per layer (sliding-window or hybrid layers, MLA).
* :func:`kv_pairs` turns a ``DynamicCache`` (or a sequence of ``(K, V)``) into per-layer pairs.
* :func:`dynamic_cache` builds a ``DynamicCache`` from per-layer pairs.

Supported: the ``transformers`` that vLLM 0.32/0.33 pins (``>=5.16.1,<5.20`` for 0.32; tested with
5.19), whose ``DynamicCache`` keeps ``cache.layers[i].keys`` / ``.values``; the ``key_cache`` /
``value_cache`` lists of older 4.x releases are read too. Nothing here is needed by the vLLM
connector, and the API itself runs without ``transformers`` when given plain tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lmcache_connector.engine.shape import KVShape


def model_shape(model_or_config: Any, dtype: torch.dtype | str | None = None) -> tuple[KVShape, str]:
    """The KV shape of a ``transformers`` model (or its config), and its name or path."""
    config = getattr(model_or_config, "config", model_or_config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None) or []
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other or (getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True)):
        raise ValueError(
            f"{type(config).__name__}: layers of kind {', '.join(other) or 'sliding_attention'} keep only part "
            "of the sequence's KV; the engine API caches full-attention models only"
        )
    if getattr(text, "kv_lora_rank", None):
        raise ValueError(f"{type(config).__name__}: compressed (MLA) KV is not supported by the engine API")
    heads = text.num_attention_heads
    head_size = getattr(text, "head_dim", None) or text.hidden_size // heads
    if dtype is None:  # a loaded model's own dtype wins over what its config says
        dtype = getattr(model_or_config, "dtype", None) if model_or_config is not config else None
        dtype = dtype or getattr(text, "dtype", None) or getattr(text, "torch_dtype", None)
    if dtype is None:
        raise ValueError(f"{type(config).__name__} names no dtype: pass dtype=")
    shape = KVShape(
        num_layers=text.num_hidden_layers,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_size=head_size,
        dtype=as_dtype(dtype),
    )
    return shape, getattr(config, "name_or_path", "") or ""


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    found = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(found, torch.dtype):
        raise ValueError(f"dtype={dtype!r}: not a torch dtype (e.g. 'bfloat16', 'float32' or torch.float16)")
    return found


def kv_pairs(kv: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(K, V)`` from a ``DynamicCache`` or a sequence of pairs (shapes checked later)."""
    layers = getattr(kv, "layers", None)
    if layers is not None:  # transformers >= 4.56: one object per layer
        pairs = []
        for i, layer in enumerate(layers):
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
                raise ValueError(f"kv layer {i} of the {type(kv).__name__} holds no K and V yet")
            pairs.append((keys, values))
        return pairs
    if hasattr(kv, "key_cache") and hasattr(kv, "value_cache"):  # older transformers 4.x
        return list(zip(kv.key_cache, kv.value_cache, strict=True))
    if isinstance(kv, Sequence) and not isinstance(kv, (str, bytes)):
        return [tuple(pair) for pair in kv]
    raise ValueError(f"kv is a {type(kv).__name__}: expected a DynamicCache or a sequence of (K, V) per layer")


def dynamic_cache(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A ``transformers`` ``DynamicCache`` holding ``pairs`` (``[1, H, T, D]`` each)."""
    try:
        from transformers import DynamicCache
    except ImportError as exc:
        raise ImportError(
            "as_cache=True needs transformers: pip install 'lmcache-connector[engine]' (or ask for plain tensors)"
        ) from exc
    if hasattr(DynamicCache, "from_legacy_cache"):  # transformers 4.x: takes the tensors as they are
        return DynamicCache.from_legacy_cache(tuple(pairs))
    # Initialised from empty views (dtype, device, layer kind), then handed the tensors themselves:
    # passing them whole would copy the prefix once more (each layer concatenates what it is given).
    cache = DynamicCache(ddp_cache_data=[(k[..., :0, :], v[..., :0, :]) for k, v in pairs])
    for layer, (keys, values) in zip(cache.layers, pairs, strict=True):
        layer.keys, layer.values = keys, values
    return cache
