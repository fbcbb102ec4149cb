"""tools/bench_step.py smoke test on CPU (a tiny variant): the implementations step, a table is printed, the CSV
holds the same rows (what tools/plan.py --measured reads)."""

import csv
import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_step.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("bench_step", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_step_times_ours_and_timm_and_prints_a_table(capsys, tmp_path):
    tool = load_tool()
    args = [
        "--variant",
        "eva_debug_p4",
        "--micro_batch_size",
        "2",
        "--steps",
        "2",
        "--warmup_steps",
        "1",
        "--precision",
        "fp32",
        "--kernels",
        "torch",
        "--baseline",
        "timm",
        "--device",
        "cpu",
        "--csv",
        str(tmp_path / "bench.csv"),
    ]
    assert tool.main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-3].split()[:3] == ["impl", "kernels", "step"]
    ours, timm = out[-2].split(), out[-1].split()
    assert ours[0] == "eva_train" and timm[0] == "timm"
    assert float(ours[2]) > 0 and timm[-1] == "1.00x" and ours[4] == "n/a"  # no MFU without a known peak
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    assert [r["impl"] for r in rows] == ["eva_train", "timm"]
    assert float(rows[0]["step_ms"]) == pytest.approx(float(ours[2]), abs=0.05)  # the table rounds to 0.1 ms
    assert rows[0]["mfu"] == "" and rows[0]["device"] == "cpu"
    assert float(rows[0]["flops_per_image"]) > 0 and rows[0]["engine"] == "torch"


@pytest.mark.slow
def test_bench_step_deepspeed_engine_steps_ours_and_the_torch_kernels(capsys, tmp_path, monkeypatch):
    """--engine deepspeed: the real ZeRO-3 engine (one rank, gloo on CPU) with activation checkpointing, for
    our model on our kernels and on torch's, and timm's Eva (built under zero.Init too)."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("MASTER_PORT", str(__import__("tests.helpers.procs", fromlist=["free_port"]).free_port()))
    args = [
        "--variant",
        "eva_debug_p4",
        "--micro_batch_size",
        "2",
        "--steps",
        "1",
        "--warmup_steps",
        "1",
        "--precision",
        "fp32",
        "--engine",
        "deepspeed",
        "--checkpoint_fraction",
        "1",
        "--impls",
        "eva_train,eva_train_torch,timm",
        "--device",
        "cpu",
        "--csv",
        str(tmp_path / "ds.csv"),
    ]
    assert load_tool().main(args) == 0
    assert "DeepSpeed ZeRO-3" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "ds.csv")))
    assert [(r["impl"], r["zero_stage"]) for r in rows] == [("eva_train", "3"), ("eva_train_torch", "3"), ("timm", "3")]
    assert rows[1]["kernels"] == "torch"  # EVA_KERNELS=torch for the reference row
    assert all(float(r["images_per_s"]) > 0 for r in rows)


def test_timm_baseline_has_our_parameter_count():
    tool = load_tool()
    args = tool.parse_args(["--variant", "eva_debug_p4", "--device", "cpu"])
    ours = sum(p.numel() for p in tool.build_ours(args).parameters())
    timm = sum(p.numel() for p in tool.TimmMIM(args).parameters())
    assert timm == ours  # same dimensions: the ratio compares like with like


@pytest.mark.parametrize(
    "args,message",
    [
        (["--variant", "eva_nope"], "unknown"),
        (["--variant", "eva_debug_p4", "--img_size", "18"], "not divisible"),
        (["--impls", "eva_train,flash"], "unknown"),
    ],
)
def test_bench_step_rejects_bad_input(capsys, args, message):
    with pytest.raises(SystemExit):
        load_tool().parse_args(args)
    assert message in capsys.readouterr().err
