#!/usr/bin/env bash
# Set up this machine (idempotent) and run the main job end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py
