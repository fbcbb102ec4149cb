"""The demo's closing step: kNN and linear-probe accuracy of the pretrained backbone against a
randomly initialised backbone of the same size, on the demo's own labeled images.

Features: center crops of the labeled train/val pair (eval.knn_* sets, else data.index /
data.val_index), extracted on all ranks (the trained model may be ZeRO-3 partitioned). kNN:
eval.knn_k / knn_temperature. Linear probe: the `linear_demo` recipe's protocol on those cached
features. Rank 0 prints the table and writes OUT/final_report.json.
"""

import json
import logging
from pathlib import Path

import torch

from eva_train.eval.knn_monitor import KnnMonitor
from eva_train.eval.linear_probe import fit_linear_probe, head_accuracy
from eva_train.eval.protocol_config import build_protocol_config
from eva_train.models import build_backbone
from eva_train.models.variants import VARIANTS
from eva_train.runtime.fsio import atomic_write_text

log = logging.getLogger(__name__)
PROBE_RECIPE = "linear_demo"
RANDOM_INIT_SEED_OFFSET = 1  # the baseline's init differs from the pretrained run's init


def _scores(monitor: KnnMonitor, model: torch.nn.Module) -> dict[str, float]:
    train_feats, train_labels, val_feats, val_labels = monitor.features(model)
    scores = monitor.scores(train_feats, train_labels, val_feats, val_labels)
    head = fit_linear_probe(train_feats, train_labels, monitor.num_classes, build_protocol_config(PROBE_RECIPE))
    probe = head_accuracy(head, val_feats.cpu(), val_labels.cpu(), prefix="linear_")
    return {**scores, **probe}


def _random_backbone(cfg, device: torch.device) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):  # leave the training RNG streams untouched
        torch.manual_seed(cfg.train.seed + RANDOM_INIT_SEED_OFFSET)
        return build_backbone(cfg.model.variant, cfg.model.img_size).to(device)


def _print_table(report: dict) -> None:
    rows = [
        ("kNN top-1", "knn_top1"),
        ("kNN top-5", "knn_top5"),
        ("linear top-1", "linear_top1"),
        ("linear top-5", "linear_top5"),
    ]
    print(
        f"\nfinal report ({report['num_classes']} classes, {report['num_train']} train / "
        f"{report['num_val']} val images, chance {100 / report['num_classes']:.1f}%)"
    )
    print(f"{'metric':<14}{'pretrained':>12}{'random init':>13}{'gain':>9}")
    for name, key in rows:
        p, r = report["pretrained"][key], report["random_init"][key]
        print(f"{name:<14}{p:>11.1f}%{r:>12.1f}%{p - r:>+8.1f}")
    print(flush=True)


def final_report(cfg, model: torch.nn.Module, rank: int, world_size: int) -> dict:
    """Collective (every rank calls it). Returns the report on every rank."""
    eval_cfg = dict(cfg.eval.__dict__)
    eval_cfg["knn_train_index"] = cfg.eval.knn_train_index or list(cfg.data.index)
    eval_cfg["knn_val_index"] = cfg.eval.knn_val_index or list(cfg.data.val_index)
    eval_cfg["knn_every_steps"] = 0
    patch_size = VARIANTS[cfg.model.variant].patch_size
    monitor = KnnMonitor(type(cfg.eval)(**eval_cfg), cfg.model.img_size, patch_size, rank, world_size, num_workers=1)
    if not (monitor.cfg.knn_train_index and monitor.cfg.knn_val_index):
        raise ValueError(
            "eval.final_report needs a labeled train/val pair: set eval.knn_train_index and "
            "eval.knn_val_index (or data.index and data.val_index)"
        )
    pretrained = _scores(monitor, model)
    random_init = _scores(monitor, _random_backbone(cfg, next(model.parameters()).device))
    train_set, val_set = monitor.datasets()
    report = {
        "pretrained": pretrained,
        "random_init": random_init,
        "num_classes": monitor.num_classes,
        "num_train": len(train_set),
        "num_val": len(val_set),
        "gain": {k: pretrained[k] - random_init[k] for k in pretrained},
    }
    if rank == 0:
        _print_table(report)
        path = Path(cfg.train.output_dir) / "final_report.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(report, indent=2))
    return report
