"""tools/bench_kernels.py: the benchmark's plumbing on CPU (checks, timing, CSV, PNG, tables), and its
accuracy gate, which must keep a wrong or broken provider out of the timings."""

import csv
import os
import runpy
import subprocess
import sys
import types

import torch

from eva_kernels import reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "bench_kernels.py")


def _load_tool() -> types.SimpleNamespace:
    return types.SimpleNamespace(**runpy.run_path(TOOL, run_name="bench_kernels"))  # its functions, main not run


def test_bench_kernels_cpu_smoke_writes_csv_png_and_table(tmp_path):
    cmd = [
        sys.executable,
        TOOL,
        "--cpu-smoke",
        "--ops",
        "add_layer_norm",
        "attention",
        "--modes",
        "fwd+bwd",
        "--batches",
        "1",
        "--providers",
        "ours",
        "torch",
        "sdpa_math",
        "sdpa_cudnn",
        "--out-dir",
        str(tmp_path),
    ]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}
    )
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

    summary = subprocess.run(
        [sys.executable, TOOL, "--summary-from", str(tmp_path / "bench_kernels.csv")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert summary.returncode == 0, summary.stderr[-2000:]
    lines = summary.stdout.strip().splitlines()
    assert len(lines) == 1 + 4 + 1  # header, one row per (op, shape) at batch 1, the verdict
    assert lines[-1].startswith("ours >= best peer in ") and "/4 cases" in lines[-1]


def _attention_inputs(dtype):
    torch.manual_seed(0)
    return tuple(torch.randn(1, 2, 9, 88, dtype=dtype).requires_grad_() for _ in range(3))


def test_accuracy_gate_rejects_a_wrong_output_or_gradient_and_reports_a_broken_provider():
    bench = _load_tool()
    inputs = _attention_inputs(torch.bfloat16)
    assert bench.check_provider("attention", torch.nn.functional.scaled_dot_product_attention, inputs) is None
    assert bench.check_provider("attention", reference.attention, inputs) is None

    slightly_off = lambda q, k, v: reference.attention(q, k, v) * 1.02  # noqa: E731 (beyond bf16 rounding)
    assert bench.check_provider("attention", slightly_off, inputs).startswith("WRONG: output 0")

    class WrongBackward(torch.autograd.Function):  # right output, gradient of q zeroed
        @staticmethod
        def forward(ctx, q, k, v):
            ctx.save_for_backward(q, k, v)
            return reference.attention(q, k, v)

        @staticmethod
        def backward(ctx, grad):
            with torch.enable_grad():
                q, k, v = (t.detach().requires_grad_() for t in ctx.saved_tensors)
                dq, dk, dv = torch.autograd.grad(reference.attention(q, k, v), (q, k, v), grad)
            return torch.zeros_like(dq), dk, dv

    assert bench.check_provider("attention", WrongBackward.apply, inputs).startswith("WRONG: grad 0")

    def broken(q, k, v):
        raise RuntimeError("no kernel image for this device\nsecond line")

    assert (
        bench.check_provider("attention", broken, inputs)
        == "unavailable: RuntimeError: no kernel image for this device"
    )


def test_accuracy_gate_scales_the_atol_of_summed_layer_norm_gradients():
    bench = _load_tool()
    torch.manual_seed(1)
    x, residual = (torch.randn(3, 7, 40).requires_grad_() for _ in range(2))
    weight, bias = (torch.randn(40).requires_grad_() for _ in range(2))
    inputs = (x, weight, bias, residual)
    eager = lambda x, w, b, r: reference.layer_norm(x, w, b, 1e-6, r)  # noqa: E731
    assert bench.check_provider("add_layer_norm", eager, inputs) is None

    def drifting_dbias(x, w, b, r):  # the output is exact; dbias comes back times `scale`
        return eager(x, w, b.detach() + (b - b.detach()) * scale, r)

    # |dbias| ~ 5 here, so ~3e-5 of error: over the fp32 atol of 1e-5, under its 21-row sum of 2.1e-4
    scale = 1 + 0.6e-5
    assert bench.check_provider("add_layer_norm", drifting_dbias, inputs) is None
    scale = 1 + 1e-2
    assert bench.check_provider("add_layer_norm", drifting_dbias, inputs).startswith("WRONG: grad 2")


def test_kernel_verdict_puts_wrong_numerics_before_speed():
    bench = _load_tool()
    speedups = [(1.3, "attention eva_g_p14 b32 vs sdpa_flash"), (0.8, "rope_2d eva_g_p14 b8 vs torch")]
    assert (
        bench.kernel_verdict(speedups, [])
        == "ours >= best peer in 1/2 cases; worst 0.80x (rope_2d eva_g_p14 b8 vs torch)"
    )
    assert bench.kernel_verdict(speedups, ["attention eva_g_p14 b8: WRONG: grad 0"]).startswith(
        "ours FAILED the accuracy check in 1 case(s)"
    )
