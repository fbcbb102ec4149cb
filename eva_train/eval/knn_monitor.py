"""kNN monitor for pretraining: every `eval.knn_every_steps`, weighted kNN top-1/top-5 of the
current backbone's pooled features on a small labeled train/val pair.

Called on ALL ranks with the engine's module. Every rank runs the same number of forwards on
equally sized batches (padded sharding, see `eval.data`), so ZeRO-3's parameter gathering in
the forward hooks stays in step; features are all-gathered so each rank returns the same dict.
"""

import logging

import numpy as np
import torch
from torch.utils.data import Subset

from eva_train.data.transforms import EvalTransform
from eva_train.eval.data import LabeledImages, eval_loader, open_labeled
from eva_train.eval.features import extract_features
from eva_train.eval.knn import knn_accuracy

log = logging.getLogger(__name__)


def evenly_spaced_subset(dataset: LabeledImages, max_images: int):
    """At most `max_images` samples spread over the whole set (class folders are contiguous)."""
    if max_images <= 0 or len(dataset) <= max_images:
        return dataset
    keep = np.linspace(0, len(dataset) - 1, max_images).round().astype(np.int64)
    return Subset(dataset, keep.tolist())


class KnnMonitor:
    def __init__(
        self,
        eval_cfg,
        img_size: int,
        patch_size: int,
        rank: int,
        world_size: int,
        batch_size: int | None = None,
        num_workers: int = 2,
    ):
        if eval_cfg.knn_every_steps > 0 and not (eval_cfg.knn_train_index and eval_cfg.knn_val_index):
            raise ValueError(
                "eval.knn_every_steps > 0 needs eval.knn_train_index and eval.knn_val_index "
                "(labeled index files or image folders); set them or --eval.knn_every_steps=0"
            )
        if img_size % patch_size:
            raise ValueError(f"kNN monitor img_size {img_size} is not a multiple of patch size {patch_size}")
        self.cfg = eval_cfg
        self.img_size, self.rank, self.world_size = img_size, rank, world_size
        self.batch_size = batch_size or getattr(eval_cfg, "knn_batch_size", 64)
        self.num_workers = num_workers
        self._sets = None  # opened on first run: start-up stays cheap when the monitor never fires

    def due(self, step: int) -> bool:
        every = self.cfg.knn_every_steps
        return every > 0 and step > 0 and step % every == 0

    def datasets(self):
        """(train, val) labeled sets, opened on first use (at most knn_max_images each)."""
        if self._sets is None:
            transform = EvalTransform(self.img_size)
            train = open_labeled(self.cfg.knn_train_index).with_transform(transform)
            val = open_labeled(self.cfg.knn_val_index).with_transform(transform)
            self.num_classes = max(len(train.class_names), int(train.labels.max()) + 1, int(val.labels.max()) + 1)
            self._sets = (
                evenly_spaced_subset(train, self.cfg.knn_max_images),
                evenly_spaced_subset(val, self.cfg.knn_max_images),
            )
        return self._sets

    def features(self, model: torch.nn.Module):
        """(train_feats, train_labels, val_feats, val_labels) of `model`'s pooled output."""
        param = next(model.parameters())
        loaders = [
            eval_loader(ds, self.batch_size, self.rank, self.world_size, self.num_workers) for ds in self.datasets()
        ]
        was_training = model.training
        model.eval()
        try:
            train = extract_features(model, loaders[0], param.device, self.world_size, param.dtype)
            val = extract_features(model, loaders[1], param.device, self.world_size, param.dtype)
        finally:
            model.train(was_training)
        return (*train, *val)

    def run(self, model: torch.nn.Module) -> dict[str, float]:
        """`{"knn_top1": %, "knn_top5": %}`; the same on every rank."""
        return self.scores(*self.features(model))

    def scores(self, train_feats, train_labels, val_feats, val_labels) -> dict[str, float]:
        """kNN top-1/top-5 of already extracted features, with this monitor's k and temperature."""
        return knn_accuracy(
            train_feats,
            train_labels,
            val_feats,
            val_labels,
            self.num_classes,
            k=self.cfg.knn_k,
            temperature=self.cfg.knn_temperature,
        )
