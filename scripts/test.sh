#!/usr/bin/env bash
# Set up .venv and the virtual display if needed, then run the whole test suite, the GUI tests
# included, under xvfb-run. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-display.sh
bash scripts/setup-env.sh
exec xvfb-run -a -s "-screen 0 1600x1200x24" .venv/bin/python -m pytest -p no:cacheprovider "$@"
