#!/usr/bin/env bash
# Set up a fresh machine (idempotent) and run the whole test suite. .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
# pytest exits 5 when it collects no test: that is a failure here, as every other non-zero code.
exec .venv/bin/python -m pytest -q tests "$@"
