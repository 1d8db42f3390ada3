#!/usr/bin/env bash
# Provision Google Research Football (gfootball 2.10.2) for the grf/* tasks.
#
# gfootball ships as a source release whose C++ engine is compiled during `pip install`.
# This script installs the system libraries the engine needs (apt-get), then builds the
# package into the Python named by $PYTHON (default: python3 on PATH). It is idempotent:
# it exits at once when gfootball already imports, and skips apt-get when every system
# package is present. Nothing is downloaded except from apt and PyPI.
#
# Usage:  bash envs/install_grf.sh                      # the python3 on PATH
#         PYTHON=.venv/bin/python bash envs/install_grf.sh

set -euo pipefail

PYTHON="${PYTHON:-python3}"
GFOOTBALL_VERSION="2.10.2"
SYSTEM_PACKAGES=(
    cmake build-essential libgl1-mesa-dev libsdl2-dev libsdl2-image-dev libsdl2-ttf-dev
    libsdl2-gfx-dev libboost-all-dev libdirectfb-dev libst-dev mesa-utils xvfb
)

log() { echo "[install_grf] $*"; }
die() { echo "[install_grf] error: $*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null 2>&1 || die "Python interpreter '$PYTHON' not found; set PYTHON."

# Quick exit: the engine already imports in this Python.
if "$PYTHON" -c "import gfootball.env.football_env, gfootball_engine" >/dev/null 2>&1; then
    log "gfootball is already installed for $("$PYTHON" -c 'import sys; print(sys.executable)')."
    exit 0
fi

# 1. System packages, only those missing.
missing=()
for package in "${SYSTEM_PACKAGES[@]}"; do
    if ! dpkg -s "$package" 2>/dev/null | grep -q '^Status: install ok installed'; then
        missing+=("$package")
    fi
done
if ((${#missing[@]} > 0)); then
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install by hand: ${missing[*]}."
    if [[ "$(id -u)" -eq 0 ]]; then
        as_root=()
    else
        command -v sudo >/dev/null 2>&1 || die "not root and no sudo; install: ${missing[*]}."
        as_root=(sudo)
    fi
    log "apt-get install ${missing[*]}"
    "${as_root[@]}" apt-get update
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${missing[@]}"
else
    log "system packages already present."
fi

# 2. The Python package. The engine build runs `python3 -c 'import psutil'` to size its
# parallelism, so the target interpreter's bin dir goes first on PATH; build isolation is
# off so that the build sees psutil; six is needed at import time.
python_bin_dir="$("$PYTHON" -c 'import os, sys; print(os.path.dirname(sys.executable))')"
export PATH="$python_bin_dir:$PATH"
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "pip is missing for $PYTHON."

log "installing build helpers (psutil, six, setuptools, wheel)"
"$PYTHON" -m pip install psutil six setuptools wheel

log "building gfootball==$GFOOTBALL_VERSION (about 5 minutes on 2 cores)"
"$PYTHON" -m pip install --no-build-isolation "gfootball==$GFOOTBALL_VERSION"

"$PYTHON" -c "import gfootball.env.football_env, gfootball_engine" \
    || die "gfootball installed but does not import; see the pip output above."
log "done: gfootball $GFOOTBALL_VERSION is importable."
