"""kNN monitor: single process, and inside a real 2-rank ZeRO-3 pretraining run (eva_train/pretrain.py)
compared with an offline evaluation of the consolidated weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eva_train.config import EvalConfig, ModelConfig
from eva_train.eval.knn_monitor import KnnMonitor
from tests.helpers.data import write_class_folder

IMG, PATCH = 16, 4
REPO = Path(__file__).parents[1]


def _monitor(train_dir, val_dir, rank=0, world_size=1, **kw) -> KnnMonitor:
    cfg = EvalConfig(
        knn_every_steps=5,
        knn_train_index=[str(train_dir)],
        knn_val_index=[str(val_dir)],
        knn_k=5,
        knn_batch_size=3,
        **kw,
    )
    return KnnMonitor(cfg, IMG, PATCH, rank, world_size, num_workers=0)


def _folders(root):
    return (
        write_class_folder(root / "train", per_class=6, seed=0),  # 18 images
        write_class_folder(root / "val", per_class=2, seed=1, num_classes=3),
    )


def _model():
    from eva_train.models import build_model

    return build_model(ModelConfig(variant="eva_debug_p4", img_size=IMG, drop_path_rate=0.1), teacher_dim=8)


def test_monitor_schedule_and_missing_sets(tmp_path):
    train, val = _folders(tmp_path)
    mon = _monitor(train, val)
    assert [s for s in range(0, 21) if mon.due(s)] == [5, 10, 15, 20]
    with pytest.raises(ValueError, match="knn_train_index"):
        KnnMonitor(EvalConfig(knn_every_steps=5), IMG, PATCH, 0, 1)
    assert not KnnMonitor(EvalConfig(), IMG, PATCH, 0, 1).due(100)  # off by default


def test_monitor_scores_a_random_model_and_restores_train_mode(tmp_path):
    train, val = _folders(tmp_path)
    torch.manual_seed(0)
    model = _model().train()
    metrics = _monitor(train, val).run(model)
    assert model.training
    assert set(metrics) == {"knn_top1", "knn_top5"}
    assert 0.0 <= metrics["knn_top1"] <= metrics["knn_top5"] == 100.0  # 3 classes: top-5 is everything
    # the color classes are easy even for random features: far above chance (33%)
    assert metrics["knn_top1"] > 60.0
    # max_images keeps a subset spread over all classes
    small = _monitor(train, val, knn_max_images=6)
    small.run(model)
    assert len(small.datasets()[0]) == 6


@pytest.mark.slow
def test_monitor_in_two_rank_zero3_pretraining_matches_offline_evaluation(tmp_path):
    """The real entry point: the kNN it logs at the last step equals an offline evaluation of the
    consolidated final checkpoint."""
    from eva_train.eval.checkpoints import load_backbone
    from eva_train.export.consolidate import consolidate

    out, demo = tmp_path / "run", tmp_path / "demo"
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline", PYTHONPATH=str(REPO))
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        "29731",
        str(REPO / "eva_train" / "pretrain.py"),
        "--output_dir",
        str(out),
        f"--data.demo_root={demo}",
        "--train.total_steps=2",
        "--eval.knn_every_steps=1",
        "--eval.knn_max_images=96",
        "--checkpoint.every_steps=0",
        "--logging.log_every_steps=1",
        "--logging.wandb=false",
        "--logging.progress_bar=false",
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    knn_rows = [r for r in logged if "knn_top1" in r]
    assert [r["step"] for r in knn_rows] == [1, 2]

    consolidate(str(out / "checkpoints"), str(tmp_path / "final.safetensors"))
    backbone, _ = load_backbone(str(tmp_path / "final.safetensors"), variant="eva_demo_p8", img_size=64)
    cfg = EvalConfig(
        knn_train_index=[str(demo / "train.arrow")], knn_val_index=[str(demo / "val.arrow")], knn_max_images=96
    )
    offline = KnnMonitor(cfg, 64, 8, 0, 1, num_workers=0).run(backbone.eval())
    assert offline == {"knn_top1": knn_rows[-1]["knn_top1"], "knn_top5": knn_rows[-1]["knn_top5"]}
