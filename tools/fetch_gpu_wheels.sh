#!/usr/bin/env bash
# Build .whl/ here: the Python packages that tools/gpu_check.sh needs and the GPU image lacks
# (it has torch, triton, timm, numpy, pyarrow, huggingface-hub, regex, safetensors, msgpack,
# einops, ninja, psutil, py-cpuinfo, tqdm, packaging). The folder travels with the device call
# (`carry: [".whl"]`, 64 MiB limit), and gpu_check.sh installs it with pip --no-index.
#   usage: bash tools/fetch_gpu_wheels.sh [--with-wandb]
# Versions follow this venv where it has the package, so the GPU runs what CI tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-/work/venv/bin/python}
DEST=.whl
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

pinned() {  # NAME -> NAME==VERSION of this venv, or NAME when absent here
    local version
    version=$("$PY" -m pip show "$1" 2>/dev/null | awk '/^Version:/{print $2}')
    if [[ -n "$version" ]]; then echo "$1==$version"; else echo "$1"; fi
}

rm -rf "$DEST.tmp" && mkdir -p "$DEST.tmp"
# DeepSpeed ships an sdist only; its wheel is pure Python (ops JIT-build on the GPU if ever used).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w "$DEST.tmp" "$(pinned deepspeed)"
# deepspeed needs hjson + pydantic; open_clip needs ftfy (+ wcwidth).
packages=(open_clip_torch ftfy wcwidth hjson pydantic pydantic_core annotated_types typing_inspection)
if [[ "${1:-}" == "--with-wandb" ]]; then
    packages+=(wandb platformdirs sentry_sdk gitpython gitdb smmap setproctitle)
fi
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
for name in "${packages[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platform_args[@]}" -d "$DEST.tmp" "$(pinned "$name")"
done
rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
du -sh "$DEST"
ls "$DEST"
