"""The Triton kernels compile for the H100 (sm_90) in compiled mode: what the CPU interpreter cannot check."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a fresh cache: really compile, do not reuse a binary
    result = subprocess.run(
        [sys.executable, "-m", "eva_kernels.compile_check", "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "all 8 configurations compiled for sm_90" in result.stdout


def test_compile_check_refuses_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "eva_kernels.compile_check", "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )
    assert result.returncode == 2 and "unset TRITON_INTERPRET" in result.stderr
