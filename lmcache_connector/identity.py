"""Which weights made the KV bytes: cheap fingerprints of a model checkpoint and of a LoRA adapter.

Stored KV is only valid for the exact weights that computed it, so cache keys carry the weights'
identity, not a name: a served alias ("default") or a path survives a model upgrade. Reading the
weights would cost minutes, so a checkpoint is identified by what changes whenever it is replaced:

* a local folder: the bytes of its ``config.json`` / ``adapter_config.json`` plus, for every weight
  or JSON file in it, the file's name, size and modification time (one ``stat`` per file, no read
  of weights). A checkpoint written over the old one at the same path gets new keys; the price is
  that a byte-identical copy with other modification times gets other keys too (the operator's
  ``LMCACHE_MODEL_NAME`` says "these are the same weights" and skips the fingerprint);
* a Hugging Face Hub id: the commit of the snapshot in the local Hub cache (content-addressed);
* anything else (an unresolvable id, a remote URI): nothing beyond the name and revision.

The scheduler and every worker compute these independently, in different processes, so everything
here depends only on the configuration and the files: no clocks, no randomness, no network.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

# Files whose replacement means other weights (or another reading of them: quantization configs are
# JSON). Tokenizer files are included by the JSON rule; harmless, they rarely change alone.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".json")
_CONFIG_FILES = ("config.json", "adapter_config.json")


def checkpoint_fingerprint(model: str, revision: str | None = None, hub_cache_dir: str | None = None) -> str:
    """A short, stable fingerprint of the checkpoint at ``model`` ('' when there is nothing local to see).

    ``hub_cache_dir`` is where vLLM downloads Hub models (``--download-dir``; None: the default cache).
    """
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        return "files:" + _folder_digest(path)
    if os.path.isfile(path):  # a single-file checkpoint (GGUF)
        return "file:" + _digest([_stat_line(os.path.basename(path), os.stat(path))])
    commit = _hub_snapshot_commit(model, revision, hub_cache_dir)
    return f"hub:{commit}" if commit else ""


def lora_identity(lora_request: Any | None) -> str | None:
    """What identifies a request's LoRA adapter in its keys: name, path and the adapter files' fingerprint.

    A name alone is not enough: two adapters may share one name over time (or across engines).
    A Hub adapter is downloaded by the worker only when first used, so for it the path stands alone:
    resolving it here would give the same adapter other keys before and after that download.
    """
    if lora_request is None:
        return None
    path = getattr(lora_request, "lora_path", "") or ""
    local = os.path.expanduser(path)
    try:
        files = "files:" + _folder_digest(local) if path and os.path.isdir(local) else ""
    except OSError:
        files = ""
    return "\0".join((lora_request.lora_name, path, files))


def _folder_digest(folder: str) -> str:
    lines = []
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if not entry.name.endswith(_WEIGHT_SUFFIXES) or not entry.is_file():
                continue
            lines.append(_stat_line(entry.name, entry.stat()))
    contents = b""
    for name in _CONFIG_FILES:
        try:
            with open(os.path.join(folder, name), "rb") as f:
                contents += name.encode() + b"\0" + f.read()
        except OSError:
            pass
    return _digest(lines, contents)


def _stat_line(name: str, st: os.stat_result) -> str:
    return f"{name}\0{st.st_size}\0{st.st_mtime_ns}"


def _digest(lines: list[str], contents: bytes = b"") -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update("\n".join(lines).encode())
    h.update(b"\n\0")
    h.update(contents)
    return h.hexdigest()


def _hub_snapshot_commit(repo_id: str, revision: str | None, cache_dir: str | None) -> str | None:
    """The commit of ``repo_id``'s cached snapshot at ``revision``: a file lookup, never a download."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision)
    except Exception:  # not a repo id at all, or no huggingface_hub
        return None
    if not isinstance(found, str):
        return None
    return os.path.basename(os.path.dirname(found))  # .../snapshots/<commit>/config.json
