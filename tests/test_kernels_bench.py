"""tools/bench_kernels.py --cpu-smoke: the benchmark's plumbing (checks, timing, CSV, PNG, table) on CPU."""
import csv
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_kernels_cpu_smoke_writes_csv_png_and_table(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "tools", "bench_kernels.py"), "--cpu-smoke", "--ops", "add_layer_norm",
           "attention", "--modes", "fwd+bwd", "--batches", "1", "--providers", "ours", "torch", "sdpa_math",
           "sdpa_cudnn", "--out-dir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stderr[-2000:]
    with open(tmp_path / "bench_kernels.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["op"] for r in rows} == {"add_layer_norm", "attention"}
    ours = [r for r in rows if r["provider"] == "ours"]
    assert ours and all(r["note"] == "" and float(r["ms"]) > 0 and r["speedup_vs_best_peer"] for r in ours)
    # a backend that cannot run on CPU is reported, never timed
    cudnn = [r for r in rows if r["provider"] == "sdpa_cudnn"]
    assert cudnn and all(r["note"].startswith("unavailable") and r["ms"] == "" for r in cudnn)
    assert (tmp_path / "bench_kernels.png").stat().st_size > 10_000
    last_lines = result.stdout.strip().splitlines()
    assert last_lines[-1].startswith("attention") and "measured copy" in result.stdout
