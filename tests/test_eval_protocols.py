"""Linear probe, fine-tune and predict end to end on CPU (real DeepSpeed processes, tiny data),
plus the protocol config, schedule and parameter groups."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from eva_train.config import ConfigError
from eva_train.eval.optim import layer_id, param_groups, protocol_lr
from eva_train.eval.protocol_config import build_protocol_config, validate_protocol
from tests.helpers.data import write_class_folder

REPO = Path(__file__).parents[1]
TINY = [
    "--model.variant=eva_debug_p4",
    "--model.img_size=16",
    "--train.global_batch_size=8",
    "--train.micro_batch_size=8",
    "--data.num_workers=0",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """3 color classes (train 10 each, val 4 each) and a random eva_debug_p4 backbone file."""
    from eva_train.models import build_backbone

    root = tmp_path_factory.mktemp("tiny")
    write_class_folder(root / "train", per_class=10, seed=0)
    write_class_folder(root / "val", per_class=4, seed=1)
    torch.manual_seed(0)
    save_file(
        build_backbone("eva_debug_p4", 16).state_dict(),
        str(root / "backbone.safetensors"),
        metadata={"variant": "eva_debug_p4", "img_size": "16"},
    )
    return root


def _tool(name, *args):
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline", PYTHONPATH=str(REPO))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / name), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _history(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def _data(tiny):
    return [
        f"--checkpoint={tiny / 'backbone.safetensors'}",
        f"--data.train={tiny / 'train'}",
        f"--data.val={tiny / 'val'}",
    ]


@pytest.mark.slow
def test_linear_probe_beats_chance_resumes_and_predicts(tiny, tmp_path):
    out = tmp_path / "linear"
    args = ["--recipe", "linear_demo", *_data(tiny), *TINY, f"--output_dir={out}", "--optim.warmup_epochs=1"]
    proc = _tool("linear_probe.py", *args, "--train.epochs=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = _history(out)
    assert [r["epoch"] for r in first] == [1, 2, 3]
    assert (out / "checkpoints" / "step_00000003" / "COMPLETE").exists()
    # a longer schedule in the same output dir continues after epoch 3 instead of starting over
    proc = _tool("linear_probe.py", *args, "--train.epochs=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = _history(out)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert history[-1]["top1"] > 100 / 3 + 20  # chance is 33%
    assert 0 <= history[-1]["top1"] <= history[-1]["top5"] == 100.0

    from eva_train.eval.predict import predict

    val_images = sorted(str(p) for p in (tiny / "val").rglob("*.png"))
    top = predict(val_images, str(out / "classifier.safetensors"), top_k=2)
    assert all(len(t) == 2 and t[0][1] >= t[1][1] for t in top)
    right = sum(t[0][0] == Path(p).parent.name for t, p in zip(top, val_images))
    assert 100.0 * right / len(val_images) == pytest.approx(history[-1]["top1"])


@pytest.mark.slow
def test_finetune_learns_two_classes_and_predict_names_them(tiny, tmp_path):
    root = tmp_path / "two"
    write_class_folder(root / "train", per_class=12, num_classes=2, seed=2)
    write_class_folder(root / "val", per_class=3, num_classes=2, seed=3)
    out = tmp_path / "finetune"
    proc = _tool(
        "finetune.py",
        "--recipe",
        "finetune_demo",
        f"--checkpoint={tiny / 'backbone.safetensors'}",
        f"--data.train={root / 'train'}",
        f"--data.val={root / 'val'}",
        *TINY,
        f"--output_dir={out}",
        "--train.epochs=4",
        "--optim.lr=3e-3",
        "--optim.warmup_epochs=1",
        "--aug.ema_decay=0.5",
        "--aug.mixup=0.2",
        "--aug.cutmix=0",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = _history(out)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["top1"] == 100.0 and "ema_top1" in history[-1]
    assert (out / "classifier_ema.safetensors").exists()

    proc = _tool(
        "predict.py",
        str(root / "val" / "class_0" / "0.png"),
        str(root / "val" / "class_1" / "1.png"),
        "--checkpoint",
        str(out / "classifier.safetensors"),
        "--json",
        "--top_k",
        "1",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = [json.loads(line)["top_k"][0]["class"] for line in proc.stdout.splitlines()]
    assert answers == ["class_0", "class_1"]


def test_predict_on_a_backbone_file_says_to_finetune_first(tiny):
    from eva_train.eval.predict import predict

    with pytest.raises(ValueError, match="holds no classifier"):
        predict([str(tiny / "val" / "class_0" / "0.png")], str(tiny / "backbone.safetensors"))


def test_label_count_mismatch_is_a_one_line_error(tiny, tmp_path, capsys):
    from eva_train.eval.cli import main
    from eva_train.eval.linear_probe import run_linear_probe

    write_class_folder(tmp_path / "val2", per_class=2, num_classes=2)
    code = main(
        ["--recipe", "linear_demo", *_data(tiny)[:2], f"--data.val={tmp_path / 'val2'}", *TINY],
        "linear_demo",
        "linear",
        run_linear_probe,
    )  # fails before any process group exists
    assert code == 2
    assert capsys.readouterr().err.strip().startswith("error: label count mismatch")


def test_config_errors_name_the_fix(tiny):
    with pytest.raises(ConfigError, match="unknown key 'optim.lrr'"):
        build_protocol_config("linear_demo", ["--optim.lrr=1"])
    with pytest.raises(ConfigError, match="not found"):
        build_protocol_config("no_such_recipe")
    cfg = build_protocol_config("finetune_demo", [f"--data.train={tiny}", f"--data.val={tiny}"])
    with pytest.raises(ConfigError, match="model.checkpoint"):
        validate_protocol(cfg, 1)
    cfg.model.checkpoint = str(tiny / "backbone.safetensors")
    cfg.train.global_batch_size = 48
    with pytest.raises(ConfigError, match="not a multiple"):
        validate_protocol(cfg, world_size=4)  # 48 / (32 x 4)
    for recipe in ("linear_vit_b16", "finetune_vit_b16"):
        bench = build_protocol_config(recipe)
        assert bench.train.epochs == 100 and bench.model.variant == "eva_mae_b16"
    assert build_protocol_config("linear_vit_b16").peak_lr() == pytest.approx(6.4)  # 0.1 x 16384 / 256
    lars_zero = build_protocol_config(
        "linear_vit_b16",
        [f"--data.train={tiny}", f"--data.val={tiny}", f"--model.checkpoint={tiny / 'backbone.safetensors'}"],
    )
    validate_protocol(lars_zero, world_size=64)  # the benchmark recipe: LARS without ZeRO
    for stage in (1, 2, 3):
        lars_zero.train.zero_stage = stage
        with pytest.raises(ConfigError, match="optim.name=lars with train.zero_stage"):
            validate_protocol(lars_zero, world_size=64)


def test_schedule_and_layer_decay_groups():
    cfg = build_protocol_config(
        "linear_demo", ["--optim.lr=1.0", "--optim.min_lr=0.1", "--optim.warmup_epochs=2", "--train.epochs=10"]
    )
    lrs = [protocol_lr(cfg, epoch, batch, 4) for epoch in range(10) for batch in range(4)]  # 40 steps, 8 warmup
    assert lrs[:8] == pytest.approx([k / 8 for k in range(1, 9)])  # linear, peak at the last warmup step
    assert lrs[8] == pytest.approx(1.0)  # cosine starts at the peak
    assert lrs[8 + 16] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the 32 decay steps
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 31 / 32)))
    assert [
        layer_id(n, 12)
        for n in (
            "backbone.cls_token",
            "backbone.blocks.0.attn.qkv.weight",
            "backbone.blocks.11.mlp.fc2.bias",
            "head.linear.weight",
        )
    ] == [0, 1, 12, 13]
    from eva_train.eval.heads import Classifier, LinearHead
    from eva_train.models import build_backbone

    model = Classifier(build_backbone("eva_debug_p4", 16), LinearHead(32, 3, False, 0.01))
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5, num_blocks=2)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    scale_of = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert scale_of[id(model.head.linear.weight)] == (1.0, 0.05)
    assert scale_of[id(model.head.linear.bias)] == (1.0, 0.0)
    assert scale_of[id(model.backbone.cls_token)] == (0.125, 0.0)  # 0.5 ** 3, no decay
    assert scale_of[id(model.backbone.blocks[0].attn.proj.weight)] == (0.25, 0.05)
