"""The demo's closing report: pretrained vs random init, kNN and linear probe, table + json."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_eval_data import write_class_folder  # noqa: E402

from eva_train.config import build_config  # noqa: E402
from eva_train.eval.demo_report import RANDOM_INIT_SEED_OFFSET, final_report  # noqa: E402
from eva_train.models import build_backbone  # noqa: E402


def test_report_of_the_random_baseline_itself_shows_zero_gain(tmp_path, capsys):
    train = write_class_folder(tmp_path / "train", per_class=8, seed=0)
    val = write_class_folder(tmp_path / "val", per_class=3, seed=1)
    cfg = build_config("demo", ["--model.variant=eva_debug_p4", "--model.img_size=16",
                                f"--eval.knn_train_index={train}", f"--eval.knn_val_index={val}",
                                "--eval.knn_k=5", f"--train.output_dir={tmp_path / 'out'}"])
    torch.manual_seed(cfg.train.seed + RANDOM_INIT_SEED_OFFSET)
    same_as_baseline = build_backbone("eva_debug_p4", 16)
    report = final_report(cfg, same_as_baseline, rank=0, world_size=1)
    assert report["num_classes"] == 3 and report["num_train"] == 24 and report["num_val"] == 9
    assert set(report["pretrained"]) == {"knn_top1", "knn_top5", "linear_top1", "linear_top5"}
    assert report["pretrained"] == report["random_init"]
    assert all(v == 0.0 for v in report["gain"].values())
    assert report["random_init"]["linear_top1"] > 100 / 3        # color classes: above chance
    assert json.loads((tmp_path / "out" / "final_report.json").read_text()) == report
    table = capsys.readouterr().out
    assert "random init" in table and "kNN top-1" in table and "linear top-1" in table


def test_report_without_labeled_sets_says_what_to_set(tmp_path):
    cfg = build_config("demo", ["--model.variant=eva_debug_p4", "--model.img_size=16"])
    cfg.data.index, cfg.data.val_index = [], []
    with pytest.raises(ValueError, match="knn_train_index"):
        final_report(cfg, build_backbone("eva_debug_p4", 16), rank=0, world_size=1)
