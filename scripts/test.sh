#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine: set up, then run pytest (which includes
# the ruff and mypy checks).  Extra arguments go to pytest.  Usage: scripts/test.sh [-k EXPR]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
