#!/usr/bin/env bash
# Create (or update) the project's virtualenv at ./.venv with everything eva-train needs.
# Idempotent: a second run only checks. Override the interpreter with PYTHON=..., the venv with VENV=...
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first, pinned to a CUDA-capable build that also runs on CPU (users' clusters may bring
# their own torch: setup.py does not pin it). torchvision must match torch for timm/open_clip.
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  "${pip[@]}" "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
fi
if ! "$VENV/bin/python" -c "import eva_train, eva_kernels, deepspeed, timm, open_clip, matplotlib, pytest, png" \
    2>/dev/null || [ ! -x "$VENV/bin/ruff" ]; then
  "${pip[@]}" -e ".[dev]"
fi
echo "environment ready: $VENV ($("$VENV/bin/python" -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null))"
# DeepSpeed JIT-compiles a small shared-memory comm op on its first CPU launch (~1-2 min, cached in
# ~/.cache/torch_extensions). Build it once here so no test pays for it under a timeout.
if [ "${DS_ACCELERATOR:-cpu}" = "cpu" ] && ! "$VENV/bin/python" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  DS_ACCELERATOR=cpu "$VENV/bin/python" -c "
from deepspeed.accelerator import get_accelerator
get_accelerator().create_op_builder('ShareMemCommBuilder').load()" >/dev/null 2>&1 \
    && echo "deepspeed shm op ready" || echo "note: deepspeed shm op could not be prebuilt (it will build on first launch)"
fi
