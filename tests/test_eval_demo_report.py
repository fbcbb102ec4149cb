"""The demo's closing report: pretrained vs random init, kNN and linear probe, table + json."""

import json

import pytest
import torch

from eva_train.config import build_config
from eva_train.eval.demo_report import final_report
from eva_train.models import build_backbone
from tests.helpers.data import write_class_folder


class MeanColor(torch.nn.Module):
    """A 'pretrained' backbone whose feature is the mean color: the color classes are separable by
    construction, so its kNN top-1 must be 100% (an expectation that needs no code under test)."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # the report reads the device off a parameter

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mean(dim=(2, 3))  # (B, 3)


def test_report_compares_the_model_with_a_fixed_random_baseline(tmp_path, capsys):
    train = write_class_folder(tmp_path / "train", per_class=8, seed=0)
    val = write_class_folder(tmp_path / "val", per_class=3, seed=1)
    cfg = build_config(
        "demo",
        [
            "--model.variant=eva_debug_p4",
            "--model.img_size=16",
            f"--eval.knn_train_index={train}",
            f"--eval.knn_val_index={val}",
            "--eval.knn_k=5",
            f"--train.output_dir={tmp_path / 'out'}",
        ],
    )
    report = final_report(cfg, MeanColor(), rank=0, world_size=1)
    assert report["num_classes"] == 3 and report["num_train"] == 24 and report["num_val"] == 9
    assert set(report["pretrained"]) == {"knn_top1", "knn_top5", "linear_top1", "linear_top5"}
    assert report["pretrained"]["knn_top1"] == 100.0 and report["pretrained"]["knn_top5"] == 100.0
    assert report["gain"] == {k: report["pretrained"][k] - report["random_init"][k] for k in report["pretrained"]}
    assert json.loads((tmp_path / "out" / "final_report.json").read_text()) == report
    table = capsys.readouterr().out
    assert "random init" in table and "kNN top-1" in table and "linear top-1" in table


def test_report_without_labeled_sets_says_what_to_set(tmp_path):
    cfg = build_config("demo", ["--model.variant=eva_debug_p4", "--model.img_size=16"])
    cfg.data.index, cfg.data.val_index = [], []
    with pytest.raises(ValueError, match="knn_train_index"):
        final_report(cfg, build_backbone("eva_debug_p4", 16), rank=0, world_size=1)
