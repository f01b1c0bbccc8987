#!/usr/bin/env bash
# Fresh machine -> set-up -> the main job (MoDify SmolLM2-135M on the offline corpus on CPU, print the report).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export WANDB_MODE=${WANDB_MODE:-offline} TOKENIZERS_PARALLELISM=false
exec .venv/bin/python launch/main.py "$@"
