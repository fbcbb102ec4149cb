"""The planner (eva_train/plan, tools/plan.py): the GPU table, the memory model's terms against hand
counts, the cluster arithmetic, fine-tune fits, and the CLI's one-line errors. The memory model
against real DeepSpeed runs: tests/test_plan_memory.py."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from eva_train.config import build_config
from eva_train.models.variants import VARIANTS
from eva_train.plan import memory
from eva_train.plan.gpus import GPUS, custom_spec, mfu, peak_flops, spec_for_device
from eva_train.plan.report import Throughput, build_plan, predict_memory, read_ds_config
from eva_train.plan.shapes import recipe_shapes

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_table_matches_device_names_most_specific_first():
    assert spec_for_device("NVIDIA H100 80GB HBM3") is GPUS["h100"]
    assert spec_for_device("NVIDIA GH200 480GB") is GPUS["gh200"]  # not H200
    assert spec_for_device("NVIDIA A100-SXM4-40GB") is GPUS["a100-40gb"]  # not the 80 GB entry
    assert spec_for_device("NVIDIA A100-SXM4-80GB") is GPUS["a100-80gb"]
    assert spec_for_device("cpu") is None
    assert peak_flops("NVIDIA H200", "bf16") == 989e12 and peak_flops("NVIDIA H100", "fp32") is None
    assert mfu(1e12, 100.0, num_gpus=2, peak_flops_per_gpu=1e15) == pytest.approx(0.05)


def test_custom_card_needs_all_three_numbers_unless_it_edits_a_known_one():
    with pytest.raises(ValueError, match="--gpu-tflops"):
        custom_spec(None, memory_gib=94.0, link_gbs=25.0)
    card = custom_spec(GPUS["h100"], link_gbs=25.0)
    assert (card.memory_gib, card.bf16_tflops, card.link_gbs) == (79.1, 989.0, 25.0)


def test_zero_settings_come_from_the_recipes_deepspeed_json():
    z3 = memory.ZeroSettings.from_ds_config(read_ds_config("ds_configs/zero3.json"))
    offload = memory.ZeroSettings.from_ds_config(read_ds_config("ds_configs/zero3_offload.json"))
    z1 = memory.ZeroSettings.from_ds_config(read_ds_config("ds_configs/zero1.json"))
    assert (z3.stage, z3.offload_optimizer, z3.overlap_comm, z3.persistence_threshold) == (3, False, True, 1e5)
    assert offload.offload_optimizer and (z1.stage, z1.overlap_comm, z1.reduce_bucket_size) == (1, False, 5e8)


def test_block_activations_are_the_hand_count_for_eva_g():
    g = VARIANTS["eva_g_p14"]  # plain block: 8 width-sized tensors + GELU's two hidden tensors per token
    assert memory.block_saved_elements(g, 257) == 257 * (8 * 1408 + 2 * 6144)


@pytest.fixture(scope="module")
def eva_g():
    cfg = build_config("eva_g_p14_m30m")
    return cfg, recipe_shapes(cfg)


def test_eva_g_state_terms_by_zero_stage(eva_g):
    cfg, shapes = eva_g
    p = shapes.student.params
    assert p == 1_011_146_112 + 1408 + 1408 * 768 + 768  # backbone + mask token + MIM head
    state = {
        s: memory.state_bytes(shapes.student, memory.ZeroSettings(stage=s, reduce_bucket_size=0), 128, 2)
        for s in (1, 2, 3)
    }
    assert state[1]["optimizer"] == state[3]["optimizer"] == 12.0 * p / 128  # fp32 master + 2 moments
    assert state[1]["parameters"] == 2.0 * p and state[1]["gradients"] == 2.0 * p + 4.0 * p / 128
    assert state[3]["parameters"] < 2.0 * p / 128 + 2.0 * shapes.student.persistent_params + 1
    mem = {s: predict_memory(shapes, memory.ZeroSettings(stage=s), 128, 32, "bf16") for s in (1, 2, 3)}
    assert mem[3].peak < min(mem[1].peak, mem[2].peak) - 2.0 * p * (1 - 1 / 128) + 2.5 * 2**30
    # ZeRO-1's whole gradients are there at the step, after backward freed the activations
    assert mem[1].phases["optimizer step"] - mem[2].phases["optimizer step"] == pytest.approx(
        2.0 * p * (1 - 1 / 128) + mem[1].items["buckets"] - mem[2].items["buckets"]
    )


def test_activations_grow_with_the_micro_batch_and_shrink_with_checkpointing(eva_g):
    cfg, shapes = eva_g
    z3 = memory.ZeroSettings(stage=3)
    small, large = (predict_memory(shapes, z3, 128, b, "bf16").items["activations"] for b in (16, 32))
    assert large == pytest.approx(2 * small)
    half = recipe_shapes(build_config("eva_g_p14_m30m", ["--model.checkpoint_fraction=0.5"]))
    assert half.student.checkpointed_blocks == 20
    assert predict_memory(half, z3, 128, 32, "bf16").items["activations"] > large
    assert half.train_flops_per_image < shapes.train_flops_per_image  # fewer blocks recomputed


def test_eva_g_plan_on_16_nodes_of_h100(eva_g):
    cfg, _ = eva_g
    plan = build_plan(cfg, 128, GPUS["h100"], 16, 30_000_000, Throughput(0.4, "assumed"))
    assert plan["total_steps"] == math.ceil(150 * 30_000_000 / 4096)
    assert plan["gpu_hours"] == pytest.approx(plan["wall_clock_hours"] * 128)
    assert plan["fits"] and plan["largest_micro_batch"] >= 32 and plan["link_gbs"] == 50.0
    assert plan["comm_bytes_per_step"] == pytest.approx(3 * 2 * plan["student_params"] * 127 / 128)
    images_per_s = 989e12 * 0.4 / plan["train_flops_per_image"]
    assert plan["images_per_s_per_gpu"] == pytest.approx(images_per_s)  # communication hides: compute sets the pace
    assert plan["wall_clock_hours"] * 3600 == pytest.approx(plan["total_steps"] * 4096 / (images_per_s * 128))


def test_a_slow_link_makes_the_step_communication_bound(eva_g):
    cfg, _ = eva_g
    plan = build_plan(cfg, 128, custom_spec(GPUS["h100"], link_gbs=5.0), 16, 30_000_000, Throughput(0.4, "x"))
    assert not plan["comm_hidden"] and plan["step_seconds"] == plan["comm_seconds_per_step"]
    assert plan["images_per_s_per_gpu"] < 989e12 * 0.4 / plan["train_flops_per_image"]


def test_cli_prints_the_plan_and_reads_the_mfu_bench_step_measured(capsys, tmp_path):
    bench = load_tool("bench_step")
    row = {field: "" for field in bench.CSV_FIELDS}
    row.update(device="NVIDIA H100 80GB HBM3", variant="eva_g_p14", impl="eva_train", mfu=0.31, micro_batch_size=32)
    bench.write_csv(str(tmp_path / "bench.csv"), [row])
    tool = load_tool("plan")
    assert tool.main(["--nodes", "2", "--measured", str(tmp_path / "bench.csv"), "--train.micro_batch_size=16"]) == 0
    out = capsys.readouterr().out
    assert "16 x H100 80GB (2 node(s))" in out and "31% MFU (measured by bench_step on NVIDIA H100" in out
    assert "micro batch 16 x accumulation 16" in out and "dataset size assumed" in out
    assert tool.main(["--world-size", "8", "--json", "--dataset-size", "1000000"]) == 0
    assert json.loads(capsys.readouterr().out)["dataset_size"] == 1_000_000


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--gpu", "v100"], "--gpu v100 is unknown"),
        (["--nodes", "2", "--world-size", "8"], "--world-size 8 != --nodes 2"),
        (["--train.micro_batch_sise=4"], "unknown key 'train.micro_batch_sise'"),
        (["--mfu", "40"], "--mfu 40.0 must lie in (0, 1]"),
        (["--measured", "/nonexistent.csv"], "cannot read it"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(capsys, argv, message):
    assert load_tool("plan").main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_measured_on_another_card_is_refused(capsys, tmp_path):
    bench = load_tool("bench_step")
    row = {field: "" for field in bench.CSV_FIELDS}
    row.update(device="NVIDIA A100-SXM4-80GB", variant="eva_g_p14", impl="eva_train", mfu=0.3)
    bench.write_csv(str(tmp_path / "a100.csv"), [row])
    assert load_tool("plan").main(["--gpu", "h100", "--measured", str(tmp_path / "a100.csv")]) == 2
    assert "not on a H100 80GB" in capsys.readouterr().err


def test_finetune_recipes_say_whether_they_fit_on_an_80gb_card(capsys):
    assert load_tool("plan").main(["--finetune"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("fine-tune recipes on one 80 GB card")
    rows = {line.split()[0]: line for line in out[1:]}
    assert "finetune_vit_b16" in rows and "-> fits" in rows["finetune_vit_b16"]
    assert "linear_vit_b16" not in rows  # linear probes are not fine-tunes


def test_pretrain_dry_run_prints_the_same_plan(capsys, tmp_path, monkeypatch):
    from eva_train import pretrain

    monkeypatch.setenv("EVA_PLAN_GPU", "a100-40gb")
    assert pretrain.main(["--dry-run", "--output_dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "plan: demo on 1 x A100 40GB (1 node(s)), ZeRO-3, fp32, micro batch 32 x accumulation 2" in out
    assert "whole recipe: 150 steps x 64 images (2000 per epoch)" in out
    monkeypatch.setenv("EVA_PLAN_GPU", "tpu")
    assert pretrain.main(["--dry-run", "--output_dir", str(tmp_path / "out")]) == 2
    assert "EVA_PLAN_GPU=tpu is unknown" in capsys.readouterr().err
