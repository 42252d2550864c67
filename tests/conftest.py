"""Shared fixtures. Engines are expensive here (seconds to start), so tests share one engine per
configuration through module-scoped fixtures built with ``vllm_support.start_engine``."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def engine_tmp(tmp_path_factory) -> Path:
    """vLLM's, torch's and ZMQ's scratch files stay inside the test's temp folder."""
    return tmp_path_factory.mktemp("engine")
