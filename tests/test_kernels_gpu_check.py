"""tools/gpu_check.sh and tools/fetch_gpu_wheels.sh on a machine without CUDA: the scripts parse (bash -n,
shellcheck where installed), refuse bad arguments with one line and exit 2, and the GPU check lists what
it would run and exits 0 (offline wheels installed from a folder when asked), so a broken script fails CI."""

import csv
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_CHECK = os.path.join(REPO, "tools", "gpu_check.sh")
FETCH_WHEELS = os.path.join(REPO, "tools", "fetch_gpu_wheels.sh")
SCRIPTS = [GPU_CHECK, FETCH_WHEELS]
with open(os.path.join(REPO, "tools", "bench_step.py")) as _f:
    # bench_step.py is being extended: one run of several implementations (--impls) or one per backend
    STEP_NAMES = ["bench_step"] if '"--impls"' in _f.read() else ["bench_step_triton", "bench_step_torch"]


def _run(script, *args, cwd=REPO):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}  # no CUDA even on a GPU host
    return subprocess.run(["bash", script, *args], capture_output=True, text=True, timeout=120, env=env, cwd=cwd)


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
    result = _run(GPU_CHECK, "--out", "out", cwd=tmp_path)  # a relative folder is the caller's, not the repo's
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("no CUDA device here")
    steps = {line.split()[0]: line for line in lines[1:]}
    assert {"gpu_tests", "bench_kernels", *STEP_NAMES} <= steps.keys()
    assert "-m gpu" in steps["gpu_tests"] and f"--out-dir {out}" in steps["bench_kernels"]
    for name in STEP_NAMES:  # the EVA-g/14 bf16 step, checkpointed
        assert "--variant eva_g_p14 --img_size 224" in steps[name] and "--precision bf16" in steps[name]
        assert "--checkpoint_fraction 1.0" in steps[name]
    assert "timm" in steps[STEP_NAMES[0]]
    assert ("plan" in steps) == os.path.exists(os.path.join(REPO, "tools", "plan.py"))
    if os.path.exists(os.path.join(REPO, "kernels", "__main__.py")):  # the kernels' self-check at EVA shapes
        assert "-m eva_kernels --preset eva_g eva02_l" in steps["selfcheck"]
    assert not out.exists()  # nothing ran, nothing written


def test_gpu_check_installs_offline_wheels_from_a_folder(tmp_path):
    package = tmp_path / "pkg"
    (package / "gpu_check_probe").mkdir(parents=True)
    (package / "gpu_check_probe" / "__init__.py").write_text("VALUE = 42\n")
    (package / "setup.py").write_text(
        'from setuptools import setup\nsetup(name="gpu-check-probe", version="1.0", packages=["gpu_check_probe"])\n'
    )
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(package),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    result = _run(GPU_CHECK, "--dry-run", "--wheels", str(wheels))
    assert result.returncode == 0, result.stderr
    assert f"offline wheels from {wheels}: gpu_check_probe-1.0" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--wheels", "/nonexistent/wheels"], "--wheels /nonexistent/wheels is not a folder"),
        (["--frobnicate"], "unknown argument '--frobnicate'"),
    ],
)
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


FAKE_CARD = r"""#!/usr/bin/env bash
# Stands in for the interpreter on a CUDA machine: canned outputs of each program gpu_check.sh runs.
case "$*" in
    *spec_for_device*) echo "h100" ;;
    *get_device_name*) echo "cuda Fake H100" ;;
    "-c import torch, triton"*) echo "torch 0.0 (fake card)" ;;
    "-m eva_kernels "*) echo "RuntimeError: EVA_KERNELS=triton: attention failed"; exit 1 ;;
    "-m pytest "*) echo "========= 12 passed, 3 deselected in 9.10s =========" ;;
    "tools/bench_kernels.py --summary-from "*|"- "*) exec "$REAL_PYTHON" "$@" ;;  # the summaries: real
    "tools/bench_kernels.py "*) args="$*"; out=${args##*--out-dir }; cp "$KERNELS_CSV" "${out%% *}/bench_kernels.csv" ;;
    "tools/bench_step.py "*)
        args="$*"; csv=${args##*--csv }
        if [[ $args == *--csv* ]]; then
            printf 'impl,images_per_s,mfu,peak_mem_gib\neva_train,128.04,0.4123,30.5\ntimm,106.7,0.343,35.01\n' \
                >"${csv%% *}"
        fi
        echo "timm 300.0 106.7 (its table's last row)" ;;
    "tools/plan.py "*"--gpu h100"*)
        printf '    peak      22.81 GiB  of 72.00 GiB usable: fits\n  whole recipe: 7264 h\n' ;;
    *) echo "fake card: unexpected command: $*" >&2; exit 99 ;;
esac
"""
KERNELS_CSV = """op,shape,batch,mode,provider,ms,rate,unit,pct_of_peak,speedup_vs_best_peer,note
attention,eva_g_p14,32,fwd+bwd,ours,1.0,300,TFLOP/s,30,1.2,
attention,eva_g_p14,32,fwd+bwd,sdpa_flash,1.2,250,TFLOP/s,25,,
attention,eva_g_p14,32,fwd+bwd,sdpa_cudnn,,,TFLOP/s,,,WRONG: output 0: max error 0.5 > 2 x torch's 0.01 + 0.01
rope_2d,eva_g_p14,32,fwd+bwd,ours,0.5,2000,GB/s,60,0.8,
rope_2d,eva_g_p14,32,fwd+bwd,torch,0.4,2500,GB/s,75,,
"""


def test_gpu_check_closing_table_on_a_stand_in_card(tmp_path):
    """The run and summary half of the script (what the no-CUDA test cannot reach), with every program
    replaced by canned output: each step's result, a failing step's rc, the table printed last."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_CARD)
    fake.chmod(0o755)
    (tmp_path / "kernels.csv").write_text(KERNELS_CSV)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PYTHON": str(fake),
        "REAL_PYTHON": sys.executable,
        "KERNELS_CSV": str(tmp_path / "kernels.csv"),
    }
    result = subprocess.run(
        ["bash", GPU_CHECK, "--out", str(out)], capture_output=True, text=True, timeout=120, env=env, cwd=REPO
    )
    assert "unexpected command" not in result.stderr, result.stderr
    assert result.returncode == 1, result.stdout[-3000:]  # the self-check failed
    table = result.stdout[result.stdout.index("=== gpu_check on Fake H100") :].splitlines()[2:]
    rows = {line.split()[0]: line.split(None, 3)[1:] for line in table}
    assert rows["gpu_tests"][0] == "0" and rows["gpu_tests"][2] == "12 passed, 3 deselected in 9.10s"
    assert rows["selfcheck"][0] == "1" and rows["selfcheck"][2] == "RuntimeError: EVA_KERNELS=triton: attention failed"
    assert rows["bench_kernels"][2] == "ours >= best peer in 1/2 cases; worst 0.80x (rope_2d eva_g_p14 b32 vs torch)"
    with open(os.path.join(REPO, "tools", "bench_step.py")) as f:
        writes_csv = '"--csv"' in f.read()
    for name in STEP_NAMES:  # its CSV's rows where it writes one, else its last line
        assert rows[name][2] == (
            "ours 128.0 img/s 41.2% 30.5 GiB; timm 106.7 img/s 34.3% 35.0 GiB"
            if writes_csv
            else "timm 300.0 106.7 (its table's last row)"
        )
    assert (out / "bench_kernels.csv").exists() and (out / "gpu_tests.log").exists()
    with open(out / "gpu_check.csv", newline="") as f:
        recorded = {row["check"]: row for row in csv.DictReader(f)}
    assert recorded.keys() == rows.keys() and {row["device"] for row in recorded.values()} == {"Fake H100"}
    assert recorded["selfcheck"]["rc"] == "1"
    if os.path.exists(os.path.join(REPO, "tools", "plan.py")):  # its predicted peak, beside bench_step's
        assert rows["plan"] == ["0", "0", "peak 22.81 GiB of 72.00 GiB usable: fits"]
    assert recorded["gpu_tests"]["result"] == "12 passed, 3 deselected in 9.10s"  # a comma inside


def test_gpu_check_names_why_the_project_does_not_import(tmp_path):
    bare = tmp_path / "python"  # the same interpreter without site-packages: no torch there
    bare.write_text(f'#!/usr/bin/env bash\nexec "{sys.executable}" -S -I "$@"\n')
    bare.chmod(0o755)
    result = subprocess.run(
        ["bash", GPU_CHECK, "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHON": str(bare)},
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "the project does not import" in result.stderr and "No module named" in result.stderr
    assert "pip install -e .[dev]" in result.stderr
