#!/usr/bin/env bash
# Set up (idempotent), then lint, type-check, check the generated stubs and run every test,
# including the ones that start containerd, docker-registry and FUSE mounts (run as root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

echo "== ruff"
.venv/bin/ruff check .
echo "== mypy (strict on the packages)"
.venv/bin/mypy
echo "== generated gRPC stubs are current"
.venv/bin/python scripts/gen_proto.py --check
echo "== generated FlatBuffers code is current"
.venv/bin/python scripts/gen_flatbuffers.py --check
echo "== pytest"
# Every test must run in CI: conftest turns missing services into failures when CI is set.
.venv/bin/pytest "$@"
