#!/usr/bin/env bash
# The main job on the embedded default: set up .venv/ if needed, then prune -> SPP fine-tune -> evaluate
# the shipped tiny model offline (recipes/quickstart.yaml) and print the table. Extra arguments go to spp run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/spp run recipes/quickstart.yaml "$@"
