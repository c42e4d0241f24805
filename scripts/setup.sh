#!/usr/bin/env bash
# Install what lazysnap and its tests need on Debian 12 (as root), then the venv. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv
  containerd runc docker-registry skopeo umoci busybox-static openssl util-linux procps
  stargz-snapshotter flatbuffers-compiler
)
BINARIES=(fusermount3 pkg-config containerd ctr runc containerd-shim-runc-v2 docker-registry
          skopeo umoci busybox openssl gcc pkill ctr-remote flatc)

missing=()
for binary in "${BINARIES[@]}"; do
  command -v "$binary" >/dev/null 2>&1 || missing+=("$binary")
done
pkg-config --exists fuse3 2>/dev/null || missing+=("libfuse3-dev")
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >/dev/null
fi
# Debian's packages may start their own services; ours are started per test or per demo.
for service in containerd docker-registry; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$service" 2>/dev/null; then
    systemctl stop "$service" || true
  fi
done

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
pip_log=$(mktemp)
if ! { .venv/bin/python -m pip install --quiet --upgrade pip \
       && .venv/bin/python -m pip install --quiet -e '.[test,plot]'; } >"$pip_log" 2>&1; then
  cat "$pip_log" >&2
  rm -f "$pip_log"
  echo "setup: pip install failed" >&2
  exit 1
fi
rm -f "$pip_log"
.venv/bin/python -c "import pyfuse3, trio, httpx, zstandard, grpc, re2, rich, matplotlib; import snapshotter.cli" \
  || { echo "setup: the venv is incomplete" >&2; exit 1; }
echo "setup: ready ($(.venv/bin/lazysnap --help >/dev/null && echo lazysnap installed))"
