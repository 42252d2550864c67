#!/usr/bin/env bash
# Run the whole test suite (set-up included): first `ruff check` and `ruff format --check` on the
# repository (any finding fails the run), then pytest. Extra arguments go to pytest, e.g.
#   scripts/test.sh -m unit                      # the fast loop: no engine, no helm (under a minute)
#   scripts/test.sh tests/test_config.py -k chunk
# benchmarks/ is never collected (pyproject.toml); `ruff format .` fixes formatting findings.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
