"""Labeled image sources, padded sharding and ordered feature gathering."""

import pytest
import torch

from eva_train.data.transforms import EvalTransform
from eva_train.eval.data import eval_loader, image_folder, open_labeled, train_loader
from eva_train.eval.features import extract_features, gather_in_order
from tests.helpers.data import write_class_folder


def test_image_folder_labels_and_transform(tmp_path):
    write_class_folder(tmp_path, per_class=4, size=20)
    ds = image_folder(str(tmp_path)).with_transform(EvalTransform(16))
    assert ds.class_names == ["class_0", "class_1", "class_2"]
    assert list(ds.labels) == [0] * 4 + [1] * 4 + [2] * 4
    item = ds[5]
    assert item["images"].dtype == torch.uint8 and item["images"].shape == (3, 16, 16)
    assert item["label"].item() == 1


def test_bad_sources_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        open_labeled([str(tmp_path / "missing")])
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        open_labeled([str(tmp_path)])
    with pytest.raises(ValueError, match="no labeled data"):
        open_labeled([])


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_padded_shards_cover_every_sample_once(tmp_path, world_size):
    write_class_folder(tmp_path, per_class=4, size=16)  # 12 samples
    ds = image_folder(str(tmp_path)).with_transform(EvalTransform(16))
    loaders = [eval_loader(ds, 2, r, world_size) for r in range(world_size)]
    per_rank = [list(ld) for ld in loaders]
    assert len({len(b) for b in per_rank}) == 1  # same number of batches on every rank
    # emulate all_gather: stack rank-local tensors, then undo the striding like gather_in_order
    labels = [torch.cat([b["label"] for b in batches]) for batches in per_rank]
    valid = [torch.cat([b["valid"] for b in batches]) for batches in per_rank]
    ordered_labels = torch.stack(labels, 1).reshape(-1)
    ordered_valid = torch.stack(valid, 1).reshape(-1)
    assert ordered_labels[ordered_valid].tolist() == list(ds.labels)


def test_extract_features_single_rank_keeps_order(tmp_path):
    write_class_folder(tmp_path, per_class=3, size=16)
    ds = image_folder(str(tmp_path)).with_transform(EvalTransform(16))
    mean_color = lambda x: x.mean(dim=(2, 3))  # (B,3,H,W) -> (B,3)
    feats, labels = extract_features(mean_color, eval_loader(ds, 4, 0, 1), torch.device("cpu"), 1)
    assert feats.shape == (9, 3) and labels.tolist() == list(ds.labels)
    assert gather_in_order(feats, 1) is feats


def test_train_loader_too_small_is_an_error(tmp_path):
    write_class_folder(tmp_path, per_class=2, size=16)
    ds = image_folder(str(tmp_path))
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_loader(ds, batch_size=8, rank=0, world_size=1, seed=0)
