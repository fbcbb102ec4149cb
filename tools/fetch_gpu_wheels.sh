#!/usr/bin/env bash
# Offline wheels for tools/gpu_check.sh (--wheels DIR) on a GPU machine that cannot reach the
# package registry: the Python packages the project needs beyond what a CUDA PyTorch image has
# (torch, triton, timm, numpy, pyarrow, huggingface-hub, regex, safetensors, msgpack, einops, ninja,
# psutil, py-cpuinfo, tqdm, packaging). Run it where the registry is reachable, copy DIR over.
#   usage: bash tools/fetch_gpu_wheels.sh [--dest DIR] [--python-version X.Y] [--with-wandb]
#   --dest DIR           where the wheels go (default: .whl in the repository)
#   --python-version     the GPU machine's Python (default: this interpreter's)
# Env: PYTHON, the interpreter whose pip downloads and whose installed versions are pinned
# (default: python3 on PATH), so that the GPU runs what CI tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.whl
TARGET_PY=""
WITH_WANDB=0
while (( $# )); do
    case $1 in
        --dest) DEST=${2:?--dest needs a folder}; shift 2 ;;
        --python-version) TARGET_PY=${2:?--python-version needs X.Y}; shift 2 ;;
        --with-wandb) WITH_WANDB=1; shift ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "fetch_gpu_wheels.sh: unknown option '$1'; see --help" >&2; exit 2 ;;
    esac
done
if ! command -v "$PY" >/dev/null; then
    echo "fetch_gpu_wheels.sh: no Python interpreter '$PY'; set PYTHON=/path/to/python" >&2
    exit 2
fi
TARGET_PY=${TARGET_PY:-$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

pinned() {  # NAME -> NAME==VERSION installed for $PY, or NAME when it has none
    local version
    version=$("$PY" -m pip show "$1" 2>/dev/null | awk '/^Version:/{print $2}')
    if [[ -n "$version" ]]; then echo "$1==$version"; else echo "$1"; fi
}

rm -rf "$DEST.tmp" && mkdir -p "$DEST.tmp"
# DeepSpeed ships an sdist only; its wheel is pure Python (ops JIT-build on the GPU if ever used).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w "$DEST.tmp" "$(pinned deepspeed)"
# deepspeed needs hjson + pydantic; open_clip needs ftfy (+ wcwidth).
packages=(open_clip_torch ftfy wcwidth hjson pydantic pydantic_core annotated_types typing_inspection)
if (( WITH_WANDB )); then
    packages+=(wandb platformdirs sentry_sdk gitpython gitdb smmap setproctitle)
fi
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
for name in "${packages[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PY" --implementation cp \
        "${platform_args[@]}" -d "$DEST.tmp" "$(pinned "$name")"
done
rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
du -sh "$DEST"
ls "$DEST"
echo "on the GPU machine: bash tools/gpu_check.sh --wheels $DEST"
