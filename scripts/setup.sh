#!/usr/bin/env bash
# Install llada_train and its dependencies into the current Python (a venv is recommended).
# torch is pinned first (TORCH_SPEC, default torch==2.13.0) so that nothing pulls in another
# build; point pip at the CUDA or CPU wheel index you want with PIP_INDEX_URL / PIP_EXTRA_INDEX_URL.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
$PY -m pip install -q -e ".[dev]"
$PY -c "import llada_train, torch, deepspeed, hydra, lm_eval, wandb; print('llada_train installed; torch', torch.__version__)"
