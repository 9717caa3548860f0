#!/usr/bin/env bash
# Create .venv in the repository (if missing) and install napari-ebm with napari and the test tools.
# torch is pinned to 2.13.0, the CPU build: an unpinned torch pulls a CUDA build of several GB.
# To use a GPU, install a CUDA build of torch into .venv before or after this script.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "napari-ebm: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi

.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[napari,test]"
echo "napari-ebm: environment ready in .venv"
