#!/usr/bin/env bash
# Install the Debian packages for a virtual X display with Mesa OpenGL, which napari's canvas
# needs in the GUI tests (QT_QPA_PLATFORM=offscreen has no OpenGL). Needs root; does nothing
# when xvfb-run is already installed.
set -euo pipefail

if command -v xvfb-run >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "napari-ebm: xvfb-run is missing; install it as root with: bash scripts/install-display.sh" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    xvfb xauth libgl1-mesa-dri libglx-mesa0 libegl1 libdbus-1-3 libfontconfig1 \
    libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 \
    libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 >/dev/null
