"""What the engine API's KV is: its shape and dtype, the checks on what callers pass, and its key namespace.

A custom engine hands over K and V per layer as ``transformers`` holds them: ``[1, num_kv_heads,
num_tokens, head_size]`` (batch of one), or ``[num_kv_heads, num_tokens, head_size]``. Anything
else is a ``ValueError`` that names the layer, what was given and what was expected, before any
byte is copied.

The namespace (:class:`~lmcache_connector.keys.Namespace`) is built by the same rules as the vLLM
connector's: model identity (the name or path, a fingerprint of the checkpoint's files, or
``LMCACHE_MODEL_NAME``), dtype, byte geometry, block and chunk size. Its ``kv_layout`` is
:data:`LAYOUT_TAG`, which is no vLLM layout name, so chunks stored through this API and through
vLLM never match, even for the same model: the two lay out a block's bytes differently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmcache_connector.config import ConfigError, LMCacheConfig
from lmcache_connector.geometry import Geometry
from lmcache_connector.identity import checkpoint_fingerprint
from lmcache_connector.keys import Namespace

# Tokens per block: the unit of fingerprints and of partial-chunk hits. Fixed by the API (vLLM's
# default block size), so every process using the API keys a prompt the same way.
BLOCK_SIZE = 16
# The layout of one block in the engine's paged buffer: [K|V, head, token, dim] per layer.
LAYOUT_TAG = "engine-api:KHND"


@dataclass(frozen=True)
class KVShape:
    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r}: expected a whole number greater than 0")
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise ValueError(f"dtype={self.dtype!r}: expected a floating-point torch dtype (e.g. torch.bfloat16)")

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def page_bytes(self) -> int:
        """One block of one layer: K and V of every head."""
        return 2 * self.num_kv_heads * BLOCK_SIZE * self.head_size * self.dtype.itemsize

    def expected(self) -> str:
        return (
            f"[1, num_kv_heads={self.num_kv_heads}, num_tokens, head_size={self.head_size}] "
            f"(or [{self.num_kv_heads}, num_tokens, {self.head_size}]) of {self.dtype}"
        )

    def check_layers(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], num_tokens: int) -> list:
        """``layers`` (``store``'s kv) as ``(K, V)`` pairs of 3-D ``[heads, tokens, dim]`` views, each
        holding exactly ``num_tokens`` tokens; ``ValueError`` on anything else."""
        return self._check_layers("kv", layers, num_tokens, exact=True)

    def check_layers_out(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], num_tokens: int) -> list:
        """``retrieve``'s ``out`` buffers: as :meth:`check_layers`, holding at least ``num_tokens``."""
        return self._check_layers("out", layers, num_tokens, exact=False)

    def _check_layers(self, name: str, layers: Sequence, num_tokens: int, exact: bool) -> list:
        if len(layers) != self.num_layers:
            raise ValueError(f"{name} has {len(layers)} layers; this cache was built for num_layers={self.num_layers}")
        checked = []
        for i, pair in enumerate(layers):
            if len(pair) != 2:
                raise ValueError(f"{name} layer {i}: expected a (K, V) pair, got {len(pair)} tensors")
            checked.append(
                tuple(
                    self._check(f"{name} layer {i} {kv}", t, num_tokens, exact)
                    for kv, t in zip("KV", pair, strict=True)
                )
            )
        return checked

    def _check(self, what: str, tensor: torch.Tensor, num_tokens: int, exact: bool) -> torch.Tensor:
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{what} is a {type(tensor).__name__}, not a tensor: expected {self.expected()}")
        if tensor.dim() == 4:
            if tensor.shape[0] != 1:
                raise ValueError(
                    f"{what} has batch size {tensor.shape[0]}: one sequence per call (expected {self.expected()})"
                )
            tensor = tensor[0]
        if tensor.dim() != 3 or tensor.shape[0] != self.num_kv_heads or tensor.shape[2] != self.head_size:
            raise ValueError(f"{what} has shape {tuple(tensor.shape)}: expected {self.expected()}")
        if tensor.dtype != self.dtype:
            raise ValueError(
                f"{what} is {tensor.dtype}, but this cache stores {self.dtype}: build it for that dtype, "
                f"or pass .to({self.dtype})"
            )
        if exact and tensor.shape[1] != num_tokens:
            raise ValueError(
                f"{what} holds {tensor.shape[1]} tokens, but {num_tokens} tokens were given: pass the "
                f"tokens the KV was computed for (a longer cache: DynamicCache.crop({num_tokens}) first)"
            )
        if not exact and tensor.shape[1] < num_tokens:
            raise ValueError(f"{what} holds {tensor.shape[1]} tokens: it needs room for all {num_tokens} tokens given")
        return tensor


def engine_namespace(shape: KVShape, config: LMCacheConfig, model: str, revision: str | None = None) -> Namespace:
    """The key namespace of chunks stored through the API for ``model`` (a Hub id or a local path)."""
    if config.model_name:  # the operator vouches that every user of this name has the same weights
        model, checkpoint = config.model_name, ""
    else:
        if not model:
            raise ValueError(
                "model='': name the weights that computed the KV (a Hub id or a local path), or set "
                "LMCACHE_MODEL_NAME; chunks are keyed by it"
            )
        checkpoint = f"revision={revision or ''};{checkpoint_fingerprint(model, revision)}"
    return Namespace(
        model=model,
        checkpoint=checkpoint,
        model_dtype=shape.dtype_name,
        kv_dtype=shape.dtype_name,
        kv_layout=LAYOUT_TAG,
        page_bytes=shape.page_bytes,
        num_layers=shape.num_layers,
        block_size=BLOCK_SIZE,
        chunk_size=config.chunk_size,
    )


def engine_geometry(shape: KVShape, config: LMCacheConfig, namespace: Namespace) -> Geometry:
    """Blocks, chunks and memory slots for one process holding every layer (world size 1)."""
    if config.chunk_size % BLOCK_SIZE:
        lower = max(BLOCK_SIZE, config.chunk_size // BLOCK_SIZE * BLOCK_SIZE)
        raise ConfigError(
            [
                f"LMCACHE_CHUNK_SIZE={config.chunk_size}: expected a multiple of the engine API's block size "
                f"{BLOCK_SIZE} (e.g. {lower} or {lower + BLOCK_SIZE})"
            ]
        )
    blocks_per_chunk = config.chunk_size // BLOCK_SIZE
    block_bytes = shape.page_bytes * shape.num_layers
    slot_bytes = blocks_per_chunk * block_bytes
    return Geometry(
        block_size=BLOCK_SIZE,
        blocks_per_chunk=blocks_per_chunk,
        block_bytes=block_bytes,
        num_slots=config.max_local_cpu_bytes // slot_bytes,
        namespace=namespace,
        world_size=1,
    )
