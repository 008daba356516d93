#!/usr/bin/env bash
# README command 1: install, then run the local demo (pass --keep to keep it listening).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e '.[demo]'
exec python scripts/demo.py "$@"
