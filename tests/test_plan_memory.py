"""The planner's memory model against real DeepSpeed runs (tools/plan.py --validate): 2 ranks on CPU,
eva_demo_p8 at 128 px, ZeRO 1/2/3, micro batches 8 and 16, checkpoint fractions 0, 0.5 and 1. Measured:
the running total of CPU tensor bytes from torch's profiler (the CPU analogue of max_memory_allocated,
see tools/plan_measure.py). Every run must agree within 15%."""

import importlib.util
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_measure():
    spec = importlib.util.spec_from_file_location("plan_measure", TOOLS / "plan_measure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_predicted_peak_memory_agrees_with_real_deepspeed_runs(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    measure = load_measure()
    rows = measure.validate(gpu=False, timeout_s=600)
    table = measure.format_rows(rows, "torch.profiler CPU allocations")
    print(table)
    assert {r["zero"] for r in rows} == {1, 2, 3}
    assert {r["micro_batch"] for r in rows} == {8, 16} and {r["fraction"] for r in rows} == {0.0, 0.5, 1.0}
    assert all(r["world"] == 2 and r["measured"] > 0 for r in rows)
    assert all(abs(r["error"]) <= measure.TOLERANCE for r in rows), table


@pytest.mark.gpu
@pytest.mark.slow
def test_predicted_peak_memory_agrees_on_the_gpu_for_eva_l_and_eva_g():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    measure = load_measure()
    rows = measure.validate(gpu=True, timeout_s=540)
    table = measure.format_rows(rows, "torch.cuda.max_memory_allocated")
    print(table)
    assert {r["variant"] for r in rows} == {"eva02_l_p14", "eva_g_p14"}
    assert all(abs(r["error"]) <= measure.TOLERANCE for r in rows), table
