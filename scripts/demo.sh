#!/usr/bin/env bash
# The demo (set-up included): vLLM with the connector on a locally built model, cold vs warm
# time-to-first-token and the hit count.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
