"""tools/gpu_check.sh and tools/fetch_gpu_wheels.sh on a machine without CUDA: the scripts parse (bash -n,
shellcheck where installed), refuse bad arguments with one line and exit 2, and the GPU check lists what
it would run and exits 0 (offline wheels installed from a folder when asked), so a broken script fails CI."""
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_CHECK = os.path.join(REPO, "tools", "gpu_check.sh")
FETCH_WHEELS = os.path.join(REPO, "tools", "fetch_gpu_wheels.sh")
SCRIPTS = [GPU_CHECK, FETCH_WHEELS]


def _run(script, *args, timeout=120):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}  # no CUDA even on a GPU host
    return subprocess.run(["bash", script, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_script_parses(script):
    result = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_pass_shellcheck():
    result = subprocess.run(["shellcheck", *SCRIPTS], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_gpu_check_without_cuda_lists_every_step_and_exits_0(tmp_path):
    out = tmp_path / "out"
    result = _run(GPU_CHECK, "--out", str(out))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("no CUDA device here")
    steps = {line.split()[0]: line for line in lines[1:]}
    assert {"gpu_tests", "bench_kernels", "bench_step_triton", "bench_step_torch"} <= steps.keys()
    assert "-m gpu" in steps["gpu_tests"] and f"--out-dir {out}" in steps["bench_kernels"]
    for name in ("bench_step_triton", "bench_step_torch"):  # the EVA-g/14 bf16 step, checkpointed
        assert "--variant eva_g_p14 --img_size 224" in steps[name] and "--precision bf16" in steps[name]
        assert "--checkpoint_fraction 1.0" in steps[name]
    assert "--baseline timm" in steps["bench_step_triton"]
    assert ("plan" in steps) == os.path.exists(os.path.join(REPO, "tools", "plan.py"))
    if os.path.exists(os.path.join(REPO, "kernels", "__main__.py")):  # the kernels' self-check at EVA shapes
        assert "-m eva_kernels --preset eva_g eva02_l" in steps["selfcheck"]
    assert not out.exists()  # nothing ran, nothing written


def test_gpu_check_installs_offline_wheels_from_a_folder(tmp_path):
    package = tmp_path / "pkg"
    (package / "gpu_check_probe").mkdir(parents=True)
    (package / "gpu_check_probe" / "__init__.py").write_text("VALUE = 42\n")
    (package / "setup.py").write_text('from setuptools import setup\n'
                                      'setup(name="gpu-check-probe", version="1.0", packages=["gpu_check_probe"])\n')
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(package)], check=True, capture_output=True, timeout=120)
    result = _run(GPU_CHECK, "--dry-run", "--wheels", str(wheels))
    assert result.returncode == 0, result.stderr
    assert f"offline wheels from {wheels}: gpu_check_probe-1.0" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--wheels", "/nonexistent/wheels"], "--wheels /nonexistent/wheels is not a folder"),
    (["--frobnicate"], "unknown argument '--frobnicate'"),
])
def test_gpu_check_user_errors_are_one_line_and_exit_2(args, message):
    result = _run(GPU_CHECK, *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr and result.stdout == ""


def test_gpu_check_refuses_an_empty_wheels_folder(tmp_path):
    result = _run(GPU_CHECK, "--wheels", str(tmp_path))
    assert result.returncode == 2 and "no .whl files in" in result.stderr and "fetch_gpu_wheels.sh" in result.stderr


def test_fetch_gpu_wheels_help_and_bad_argument():
    help_result = _run(FETCH_WHEELS, "--help")
    assert help_result.returncode == 0 and "--dest DIR" in help_result.stdout
    bad = _run(FETCH_WHEELS, "--frobnicate")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown option '--frobnicate'" in bad.stderr
