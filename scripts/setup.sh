#!/usr/bin/env bash
# Create .venv/ (if missing) and install spp into it: torch first from $SPP_TORCH (default the CPU build
# torch==2.13.0; a GPU user sets e.g. SPP_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"),
# then the package with its [dev] extra. Safe to rerun: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # shellcheck disable=SC2086  # SPP_TORCH may carry pip options
    .venv/bin/python -m pip install -q ${SPP_TORCH:-torch==2.13.0}
fi
if ! .venv/bin/python -c "import spp_cli, pytest" 2>/dev/null || [ pyproject.toml -nt .venv/.spp-installed ]; then
    .venv/bin/python -m pip install -q -e ".[dev]"
    touch .venv/.spp-installed
fi
