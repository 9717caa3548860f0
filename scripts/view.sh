#!/usr/bin/env bash
# Set up .venv if needed, then open napari with the real microtubule tomogram and the
# "EBM reconstruction" widget docked. Extra arguments go to napari-ebm view (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
exec .venv/bin/napari-ebm view "$@"
