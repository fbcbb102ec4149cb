"""tools/bench_step.py smoke test on CPU (a tiny variant): both implementations step, a table is printed."""
import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_step.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("bench_step", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_step_times_ours_and_timm_and_prints_a_table(capsys):
    tool = load_tool()
    args = ["--variant", "eva_debug_p4", "--micro_batch_size", "2", "--steps", "2", "--warmup_steps", "1",
            "--precision", "fp32", "--kernels", "torch", "--baseline", "timm", "--device", "cpu"]
    assert tool.main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-3].split()[:2] == ["impl", "step"]
    ours, timm = out[-2].split(), out[-1].split()
    assert ours[0] == "eva_train" and timm[:2] == ["timm", "Eva"]
    assert float(ours[1]) > 0 and timm[-1] == "1.00x" and ours[3] == "n/a"  # no MFU without a known peak


def test_timm_baseline_has_our_parameter_count():
    tool = load_tool()
    args = tool.parse_args(["--variant", "eva_debug_p4", "--device", "cpu"])
    ours = sum(p.numel() for p in tool.build_ours(args).parameters())
    timm = sum(p.numel() for p in tool.TimmMIM(args).parameters())
    assert timm == ours  # same dimensions: the ratio compares like with like


@pytest.mark.parametrize("args,message", [(["--variant", "eva_nope"], "unknown"),
                                          (["--variant", "eva_debug_p4", "--img_size", "18"], "not divisible")])
def test_bench_step_rejects_bad_input(capsys, args, message):
    with pytest.raises(SystemExit):
        load_tool().parse_args(args)
    assert message in capsys.readouterr().err
