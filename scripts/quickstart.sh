#!/usr/bin/env bash
# Set up a fresh Debian 12 machine and run blocktrace's main job on a built-in default:
# create a sample disk, serve it, trace it while real clients write, and show the result.
# Usage: scripts/quickstart.sh [DIR]   (default ./demo)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/blocktrace demo "${1:-demo}"
