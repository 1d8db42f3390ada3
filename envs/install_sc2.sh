#!/usr/bin/env bash
# Provision real StarCraft II for the sc2/* tasks: the Linux game (4.10), the SMAC and
# SMACv2 maps, and the smacv2 package (github oxwhirl/smacv2, not on PyPI).
#
# NEEDS GENERAL INTERNET ACCESS (Blizzard's download server and GitHub). It is not run in
# CI and cannot run on the project's sandboxed machines; there, use the smax backend,
# JaxMARL's re-implementation of SMAC, which installs from PyPI.
#
# The game archive is protected by the password "iagreetotheeula": unpacking it means
# accepting Blizzard's AI and Machine Learning License, so this script asks you to say so:
#   https://blzdistsc2-a.akamaihd.net/AI_AND_MACHINE_LEARNING_LICENSE.html
#
# Usage:  ACCEPT_SC2_EULA=yes bash envs/install_sc2.sh
#         ACCEPT_SC2_EULA=yes PYTHON=.venv/bin/python SC2PATH=/data/StarCraftII bash envs/install_sc2.sh
#
# Environment:
#   SC2PATH            where the game goes (default: ~/StarCraftII, where pysc2 looks)
#   PYTHON             the interpreter to install smacv2 into (default: python3 on PATH)
#   SC2_SKIP_CHECKSUM  set to 1 to skip the game archive's SHA-256 check
#
# The game and the maps are skipped when already in place, so re-running is cheap.

set -euo pipefail

PYTHON="${PYTHON:-python3}"
SC2PATH="${SC2PATH:-$HOME/StarCraftII}"

GAME_URL="https://blzdistsc2-a.akamaihd.net/Linux/SC2.4.10.zip"
# SHA-256 of SC2.4.10.zip as published alongside other install scripts; we could not
# download the archive ourselves to confirm it (see SC2_SKIP_CHECKSUM).
GAME_SHA256="1052f249f30a242bf5e17cc3315324919f9689307ca6dbcdb30bb41ea3004884"
GAME_ZIP_PASSWORD="iagreetotheeula"
SMAC_MAPS_URL="https://github.com/oxwhirl/smac/releases/download/v0.1-beta1/SMAC_Maps.zip"
# The SMACv2 release adds 32x32_flat.SC2Map, the map of every protoss/terran/zerg battle.
SMACV2_MAPS_URL="https://github.com/oxwhirl/smacv2/releases/download/maps/SMAC_Maps.zip"
# The smacv2 commit this adapter was written against (2024-02-15).
SMACV2_GIT="git+https://github.com/oxwhirl/smacv2.git@577ab5a2cff2391f8df582da5731ea9cd6adf3c6"
# smacv2's own requirements pin protobuf<3.21, which would downgrade the protobuf that
# TensorBoard and Ray need. So smacv2 and pysc2 go in with --no-deps (pysc2 also lists
# enum34, which breaks Python 3), followed by the modules they import at run time.
# marl_shared/envs/sc2.py runs smacv2 in worker processes under protobuf's pure-Python
# implementation, which loads s2clientprotocol's old generated code.
PYSC2_PACKAGES=("pysc2==4.0.0" "s2clientprotocol==5.0.17.98310.0")
RUNTIME_PACKAGES=(absl-py mpyq portpicker websocket-client deepdiff requests)

log() { echo "[install_sc2] $*"; }
die() { echo "[install_sc2] error: $*" >&2; exit 1; }

if [[ "${ACCEPT_SC2_EULA:-}" != "yes" ]]; then
    die "read https://blzdistsc2-a.akamaihd.net/AI_AND_MACHINE_LEARNING_LICENSE.html and, if you accept it, re-run with ACCEPT_SC2_EULA=yes."
fi
command -v "$PYTHON" >/dev/null 2>&1 || die "Python interpreter '$PYTHON' not found; set PYTHON."
command -v unzip >/dev/null 2>&1 || die "unzip is missing; install it (apt-get install unzip)."
if command -v curl >/dev/null 2>&1; then
    download() { curl --fail --location --retry 3 --output "$2" "$1"; }
elif command -v wget >/dev/null 2>&1; then
    download() { wget --tries=3 --output-document="$2" "$1"; }
else
    die "neither curl nor wget is installed."
fi

work_dir="$(mktemp -d)"
trap 'rm -rf "$work_dir"' EXIT

# 1. The game. The archive unpacks to a folder named StarCraftII, moved to $SC2PATH.
if [[ -d "$SC2PATH/Versions" ]]; then
    log "StarCraft II already present in $SC2PATH."
else
    if [[ -e "$SC2PATH" ]]; then
        die "$SC2PATH exists but holds no game (no Versions folder); move it away first."
    fi
    log "downloading StarCraft II 4.10 for Linux (about 4 GB)..."
    download "$GAME_URL" "$work_dir/SC2.4.10.zip"
    if [[ "${SC2_SKIP_CHECKSUM:-0}" != "1" ]]; then
        echo "$GAME_SHA256  $work_dir/SC2.4.10.zip" | sha256sum --check --status \
            || die "SC2.4.10.zip does not match the expected SHA-256; set SC2_SKIP_CHECKSUM=1 only if you trust the download."
    fi
    log "unpacking the game..."
    unzip -q -P "$GAME_ZIP_PASSWORD" "$work_dir/SC2.4.10.zip" -d "$work_dir/game"
    rm "$work_dir/SC2.4.10.zip"
    mkdir -p "$(dirname "$SC2PATH")"
    mv "$work_dir/game/StarCraftII" "$SC2PATH"
fi

# 2. The maps, flattened into $SC2PATH/Maps/SMAC_Maps (the folder smacv2's map classes
# name). The SMACv2 archive goes last so its copies win where both ship a map.
map_dir="$SC2PATH/Maps/SMAC_Maps"
mkdir -p "$map_dir"
map_urls=("$SMAC_MAPS_URL" "$SMACV2_MAPS_URL")
if [[ -f "$map_dir/3m.SC2Map" && -f "$map_dir/32x32_flat.SC2Map" ]]; then
    log "SMAC and SMACv2 maps already present in $map_dir."
    map_urls=()
fi
for url in "${map_urls[@]}"; do
    archive="$work_dir/maps.zip"
    log "downloading maps from $url"
    download "$url" "$archive"
    rm -rf "$work_dir/maps"
    unzip -q -o "$archive" -d "$work_dir/maps"
    find "$work_dir/maps" -name '*.SC2Map' -exec cp -f {} "$map_dir/" \;
    rm "$archive"
done
[[ -f "$map_dir/3m.SC2Map" && -f "$map_dir/32x32_flat.SC2Map" ]] \
    || die "the map archives did not contain 3m.SC2Map and 32x32_flat.SC2Map."
log "$(find "$map_dir" -name '*.SC2Map' | wc -l) maps in $map_dir."

# 3. The Python side, into $PYTHON's environment.
log "installing smacv2 and pysc2 into $("$PYTHON" -c 'import sys; print(sys.executable)')"
"$PYTHON" -m pip install --no-deps "$SMACV2_GIT" "${PYSC2_PACKAGES[@]}"
"$PYTHON" -m pip install "${RUNTIME_PACKAGES[@]}"

# 4. Check: smacv2 imports under the pure-Python protobuf, as in the adapter's workers.
PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python "$PYTHON" -c "import smacv2.env" \
    || die "smacv2 was installed but does not import; see the error above."

log "done. pysc2 finds the game through SC2PATH; add this to your shell profile:"
log "    export SC2PATH=\"$SC2PATH\""
log "then check it with: SC2PATH=\"$SC2PATH\" marl-shared doctor"
