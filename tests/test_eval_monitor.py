"""kNN monitor: single process, and under a real 2-rank ZeRO-3 DeepSpeed run compared with an
offline evaluation of the same (gathered) weights.

This file is also the worker script of the 2-rank run (`deepspeed ... test_eval_monitor.py --worker`).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))   # the worker imports the image writer as well
from test_eval_data import write_class_folder  # noqa: E402

from eva_train.config import EvalConfig, ModelConfig  # noqa: E402
from eva_train.eval.knn_monitor import KnnMonitor  # noqa: E402

IMG, PATCH = 16, 4


def _monitor(train_dir, val_dir, rank=0, world_size=1, **kw) -> KnnMonitor:
    cfg = EvalConfig(knn_every_steps=5, knn_train_index=[str(train_dir)], knn_val_index=[str(val_dir)],
                     knn_k=5, knn_batch_size=3, **kw)
    return KnnMonitor(cfg, IMG, PATCH, rank, world_size, num_workers=0)


def _folders(root):
    return (write_class_folder(root / "train", per_class=6, seed=0),   # 18 images
            write_class_folder(root / "val", per_class=2, seed=1, num_classes=3))


def _model():
    from eva_train.models import build_model
    return build_model(ModelConfig(variant="eva_debug_p4", img_size=IMG, drop_path_rate=0.1), teacher_dim=8)


def test_monitor_schedule_and_missing_sets(tmp_path):
    train, val = _folders(tmp_path)
    mon = _monitor(train, val)
    assert [s for s in range(0, 21) if mon.due(s)] == [5, 10, 15, 20]
    with pytest.raises(ValueError, match="knn_train_index"):
        KnnMonitor(EvalConfig(knn_every_steps=5), IMG, PATCH, 0, 1)
    assert not KnnMonitor(EvalConfig(), IMG, PATCH, 0, 1).due(100)   # off by default


def test_monitor_scores_a_random_model_and_restores_train_mode(tmp_path):
    train, val = _folders(tmp_path)
    torch.manual_seed(0)
    model = _model().train()
    metrics = _monitor(train, val).run(model)
    assert model.training
    assert set(metrics) == {"knn_top1", "knn_top5"}
    assert 0.0 <= metrics["knn_top1"] <= metrics["knn_top5"] == 100.0     # 3 classes: top-5 is everything
    # the color classes are easy even for random features: far above chance (33%)
    assert metrics["knn_top1"] > 60.0
    # max_images keeps a subset spread over all classes
    small = _monitor(train, val, knn_max_images=6)
    small.run(model)
    assert len(small.datasets()[0]) == 6


def _zero3_worker(out_dir: str, train_dir: str, val_dir: str) -> None:
    import deepspeed
    import torch.distributed as dist
    from safetensors.torch import save_file

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ds_config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                 "train_batch_size": 4 * world, "gradient_clipping": 1.0,
                 "zero_optimization": {"stage": 3}}
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = _model()
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                      config=ds_config)
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):   # move the weights away from their init
        images, mask = torch.randn(4, 3, IMG, IMG, generator=g), torch.rand(4, 16, generator=g) < 0.4
        engine.backward(engine(images, mask).pow(2).mean())
        engine.step()
    monitor = _monitor(train_dir, val_dir, rank, world)
    metrics = monitor.run(engine.module)
    val_feats = monitor.features(engine.module)[2]
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        state = {k: v.detach().clone().contiguous() for k, v in engine.module.state_dict().items()}
    if rank == 0:
        save_file(state, os.path.join(out_dir, "weights.safetensors"))
        save_file({"val_feats": val_feats.contiguous()}, os.path.join(out_dir, "feats.safetensors"))
        Path(out_dir, "metrics.json").write_text(json.dumps(metrics))


@pytest.mark.slow
def test_monitor_under_zero3_two_ranks_matches_offline(tmp_path):
    from safetensors.torch import load_file

    train, val = _folders(tmp_path)
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(Path(__file__).parents[1]))
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2",
           "--master_port", "29731", __file__, "--worker", str(tmp_path), str(train), str(val)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logged = json.loads((tmp_path / "metrics.json").read_text())

    model = _model()
    model.load_state_dict(load_file(tmp_path / "weights.safetensors"))
    offline = _monitor(train, val)
    assert offline.run(model) == logged
    torch.testing.assert_close(offline.features(model)[2], load_file(tmp_path / "feats.safetensors")["val_feats"],
                               rtol=1e-4, atol=1e-4)


if __name__ == "__main__" and "--worker" in sys.argv:
    args = [a for a in sys.argv[sys.argv.index("--worker") + 1:] if not a.startswith("--local_rank")]
    _zero3_worker(*args[:3])
