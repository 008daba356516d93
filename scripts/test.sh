#!/usr/bin/env bash
# README command 2: install, then run the whole test suite (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e '.[dev]'
exec python -m pytest "$@"
