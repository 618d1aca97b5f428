#!/usr/bin/env bash
# The test command: set up .venv/ if needed, then run the whole suite offline. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export SPP_TEST_DATA=${SPP_TEST_DATA:-$(cd .. && pwd)/shared/data}
exec .venv/bin/python -m pytest -q "$@"
