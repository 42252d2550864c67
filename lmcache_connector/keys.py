"""Deterministic keys for KV chunks.

A prompt is cut into vLLM blocks; block ``i`` gets a *fingerprint* that covers the whole prefix up
to its end::

    fp[-1] = H(namespace, lora adapter, cache_salt)  # the request's root
    fp[i]  = H(fp[i-1], token ids of block i, multimodal items overlapping block i)

A chunk (``chunk_size`` tokens, a whole number of blocks) is stored under the fingerprint of its
last block, and the index remembers the fingerprints of every block boundary inside it, so a
prompt that shares only part of a chunk still reuses each whole block they share.

The namespace holds everything that changes the KV bytes of a given token sequence: the weights
(model, revision and checkpoint fingerprint, quantization, compute dtype), the KV format (dtype or
quantized format), KV layout and byte geometry, block and chunk size, tensor/pipeline-parallel size.
A LoRA adapter enters the root by identity (name, path, files), not by name alone. ``H`` is
BLAKE2b, so keys are the same in every process and on every machine: no Python ``hash()``, no
``PYTHONHASHSEED``, no dependence on vLLM's prefix-cache hash settings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

KEY_FORMAT_VERSION = 2  # 2: the namespace names the weights and the KV format
FINGERPRINT_BYTES = 16


def _h(*parts: bytes) -> bytes:
    digest = hashlib.blake2b(digest_size=FINGERPRINT_BYTES)
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))  # length-prefixed: no two inputs collide by concatenation
        digest.update(part)
    return digest.digest()


@dataclass(frozen=True)
class Namespace:
    """What makes stored KV bytes interchangeable between two engines."""

    model: str  # the model vLLM was given (Hub id or path), or LMCACHE_MODEL_NAME
    kv_dtype: str  # the KV bytes' format: a dtype, or a quantized format ("fp8_e4m3", "fp8_e5m2", ...)
    kv_layout: str
    page_bytes: int
    num_layers: int
    block_size: int
    chunk_size: int
    tp_size: int = 1
    pp_size: int = 1
    checkpoint: str = ""  # revision and fingerprint of the weights' files; "" under LMCACHE_MODEL_NAME
    quantization: str = ""  # vLLM's weight quantization method
    model_dtype: str = ""  # the dtype K and V are computed in

    def digest(self) -> bytes:
        canonical = json.dumps({"version": KEY_FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return _h(b"lmcache_connector.namespace", canonical.encode())


@dataclass(frozen=True)
class MultimodalItem:
    """A multimodal input's identity and the token range its placeholder occupies."""

    identifier: str
    offset: int
    length: int


def request_root(namespace_digest: bytes, lora: str | None = None, cache_salt: str | None = None) -> bytes:
    """The fingerprint chain's start for one request: the LoRA adapter's identity
    (``identity.lora_identity``) and cache_salt change every block."""
    return _h(namespace_digest, (lora or "").encode(), (cache_salt or "").encode())


def block_fingerprints(
    root: bytes,
    token_ids: Sequence[int],
    block_size: int,
    mm_items: Sequence[MultimodalItem] = (),
) -> list[bytes]:
    """Fingerprints of every whole block of ``token_ids`` (a trailing partial block gets none)."""
    num_blocks = len(token_ids) // block_size
    if num_blocks == 0:
        return []
    tokens = np.asarray(token_ids[: num_blocks * block_size], dtype="<u4").tobytes()
    stride = block_size * 4
    fps: list[bytes] = []
    prev = root
    for i in range(num_blocks):
        block = tokens[i * stride : (i + 1) * stride]
        extras = _mm_extras(mm_items, i * block_size, (i + 1) * block_size)
        prev = _h(prev, block, extras) if extras else _h(prev, block)
        fps.append(prev)
    return fps


def _mm_extras(items: Sequence[MultimodalItem], start: int, end: int) -> bytes:
    """The multimodal items whose placeholder overlaps ``[start, end)``: their identity and offset."""
    if not items:
        return b""
    parts = [f"{it.identifier}@{it.offset}" for it in items if it.offset < end and it.offset + it.length > start]
    return "|".join(parts).encode()


def rank_tag(tp_rank: int, pp_rank: int = 0) -> str:
    """The tag of one rank's shard of a chunk, in file names and every other storage name."""
    return f"tp{tp_rank}pp{pp_rank}"


def storage_name(namespace_hex: str, rank: str, key_hex: str) -> str:
    """The one name of one rank's copy of a chunk, wherever it is kept: ``<namespace16>-<rank>-<key>``.

    ``namespace_hex`` is the rank-less namespace digest (its first 16 hex digits go in the name),
    ``rank`` a :func:`rank_tag`, ``key_hex`` the chunk key (the fingerprint of its last block, or of
    any block boundary for the entries that point into a chunk). Lower-case hex and dashes only, so
    the name is safe as a file name, a Redis key, an S3 object name and a registry entry; each
    medium adds its own prefix or suffix (a file's ``.lmc.safetensors``, a Redis key prefix)."""
    return f"{namespace_hex[:16]}-{rank}-{key_hex}"
