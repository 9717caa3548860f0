#!/usr/bin/env bash
# Install the Debian packages for a virtual X display with Mesa OpenGL, which napari's canvas
# needs in the GUI tests (QT_QPA_PLATFORM=offscreen has no OpenGL), and the libraries that Qt 6's
# xcb platform plugin loads. Needs root only when a package is missing.
set -euo pipefail

PACKAGES=(
    xvfb xauth libgl1 libgl1-mesa-dri libglx-mesa0 libegl1 libglib2.0-0 libdbus-1-3
    libfontconfig1 libfreetype6 libx11-xcb1 libxkbcommon0 libxkbcommon-x11-0 libxcb-cursor0
    libxcb-glx0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0
    libxcb-shape0 libxcb-sync1 libxcb-util1 libxcb-xfixes0 libxcb-xinerama0 libxcb-xkb1
)

if ! command -v dpkg-query >/dev/null 2>&1; then
    if command -v xvfb-run >/dev/null 2>&1; then
        exit 0
    fi
    echo "napari-ebm: no dpkg and no xvfb-run; install Xvfb and Mesa OpenGL with your system's package manager" >&2
    exit 1
fi

missing=()
for package in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed"; then
        missing+=("$package")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "napari-ebm: missing Debian packages for the virtual display: ${missing[*]}" >&2
    echo "napari-ebm: install them as root with: bash scripts/install-display.sh" >&2
    exit 1
fi

echo "napari-ebm: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
