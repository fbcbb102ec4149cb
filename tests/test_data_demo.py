"""Demo data (idempotent, safe under concurrent callers) and the tar-shard helper for engine tests."""

import json
import multiprocessing as mp
import os

import pytest
import torch

from eva_train.config import DataConfig, MaskConfig
from eva_train.data.build import build_index
from eva_train.data.demo import ensure_demo_data
from eva_train.data.errors import DataError
from eva_train.data.index import check_index, open_index
from eva_train.data.loader import build_loader
from eva_train.data.procedural import NUM_CLASSES
from tests.helpers.data import write_tar_shards

SMALL = dict(img_size=32, num_train=60, num_val=20, seed=1)


def _ensure(root, queue):
    queue.put(ensure_demo_data(root, **SMALL))


def test_concurrent_callers_share_one_generation(tmp_path):
    ctx = mp.get_context("fork")  # two processes, like two ranks
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ensure, args=(str(tmp_path / "demo"), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1]
    train, val = results[0]
    reader = check_index([train])
    assert len(reader) == 60 and len(check_index([val])) == 20
    assert len(reader.sources[0].classes) == NUM_CLASSES
    files = sorted(p for p in (tmp_path / "demo" / "train").rglob("*.jpg"))
    assert len(files) == 60  # generated once: a second generation would have rewritten, not added
    mtime = os.path.getmtime(train)
    assert ensure_demo_data(tmp_path / "demo", **SMALL) == (train, val) and os.path.getmtime(train) == mtime


def test_demo_labels_match_generator_and_mismatch_is_an_error(tmp_path):
    train, _ = ensure_demo_data(tmp_path / "demo", **SMALL)
    reader = open_index(train)
    for row in range(0, 60, 7):
        name = os.path.basename(reader.record(row).path)
        assert reader.label(row) == int(name.split(".")[0]) % NUM_CLASSES
    with pytest.raises(DataError, match="delete .* or pass another --data.demo_root"):
        ensure_demo_data(tmp_path / "demo", img_size=64, num_train=60, num_val=20, seed=1)


def test_tar_shards_feed_two_ranks_equally(tmp_path):
    shards = write_tar_shards(tmp_path / "shards", num_samples=30, num_shards=3, img_size=32)
    assert len(shards) == 3
    index = build_index([str(tmp_path / "shards")], str(tmp_path / "t.arrow"), num_workers=1)
    reader = open_index(index)
    assert len(reader) == 30 and reader.record(0).caption.startswith("a ")
    seen = []
    for rank in range(2):
        loader, sampler = build_loader(
            DataConfig(num_workers=0),
            MaskConfig(),
            index_paths=[index],
            img_size=32,
            patch_size=8,
            micro_batch_size=5,
            rank=rank,
            world_size=2,
            seed=0,
        )
        batches = [b for b, _ in zip(loader, range(3))]
        assert all(b["images"].shape == (5, 3, 32, 32) for b in batches)
        seen.append(torch.cat([b["index"] for b in batches]).tolist())
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0] + seen[1])) == 30
    for row in range(30):
        meta = json.loads(reader.record(row).json)
        assert reader.label(row) == meta["label"] == int(meta["key"]) % NUM_CLASSES


def test_val_loader_is_one_ordered_pass_with_equal_counts(tmp_path):
    _, val = ensure_demo_data(tmp_path / "demo", **SMALL)  # 20 val images
    passes = []
    for rank in range(3):
        loader, sampler = build_loader(
            DataConfig(num_workers=0),
            MaskConfig(),
            index_paths=[val],
            img_size=32,
            patch_size=8,
            micro_batch_size=4,
            rank=rank,
            world_size=3,
            seed=0,
            train=False,
        )
        assert len(sampler) == 6 and len(loader) == 2
        batches = list(loader)
        passes.append(torch.cat([b["index"] for b in batches]).tolist())
        again = torch.cat([b["images"] for b in loader])
        assert torch.equal(again, torch.cat([b["images"] for b in batches]))  # no random crop/flip in val
    assert passes[0] == [0, 3, 6, 9, 12, 15] and passes[2] == [2, 5, 8, 11, 14, 17]
