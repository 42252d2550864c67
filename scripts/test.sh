#!/usr/bin/env bash
# Run the whole test suite (set-up included). Extra arguments go to pytest,
# e.g. `scripts/test.sh tests/test_config.py -k chunk`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
