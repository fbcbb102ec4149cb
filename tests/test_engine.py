"""Unit tests of the engine's parts that need no process group: objective, lr schedule, param groups,
input normalization, MFU peak table, wandb mode, rank environment."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from eva_train.config import ModelConfig
from eva_train.optim.schedule import lr_at_step, plan_steps
from eva_train.runtime.distributed import world_from_env
from eva_train.train.engine import normalize_images, param_groups
from eva_train.train.metrics import ThroughputMeter, peak_flops, trim_after, wandb_mode
from eva_train.train.objective import masked_cosine_loss


def test_loss_is_minus_one_for_targets_it_predicts_up_to_scale():
    target = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    pred = 3.0 * target[mask]  # cosine ignores the scale
    assert masked_cosine_loss(pred, target, mask).item() == pytest.approx(-1.0, abs=1e-6)
    assert masked_cosine_loss(-pred, target, mask).item() == pytest.approx(1.0, abs=1e-6)


def test_loss_uses_only_masked_patches_in_row_major_order():
    target = torch.randn(2, 4, 6)
    mask = torch.tensor([[0, 1, 0, 1], [1, 0, 0, 0]], dtype=torch.bool)
    pred = torch.randn(3, 6)
    expected = -torch.stack(
        [
            F.cosine_similarity(pred[0], target[0, 1], dim=0),
            F.cosine_similarity(pred[1], target[0, 3], dim=0),
            F.cosine_similarity(pred[2], target[1, 0], dim=0),
        ]
    ).mean()
    assert torch.allclose(masked_cosine_loss(pred, target, mask), expected, atol=1e-6)
    target[~mask] = 1e6  # unmasked targets cannot matter
    assert torch.allclose(masked_cosine_loss(pred, target, mask), expected, atol=1e-6)


def test_loss_gradient_flows_in_fp32_from_bf16_predictions():
    target = torch.randn(1, 3, 4)
    mask = torch.ones(1, 3, dtype=torch.bool)
    pred = torch.randn(3, 4, dtype=torch.bfloat16, requires_grad=True)
    loss = masked_cosine_loss(pred, target, mask)
    assert loss.dtype == torch.float32
    loss.backward()
    assert pred.grad is not None and pred.grad.dtype == torch.bfloat16


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        masked_cosine_loss(torch.randn(2, 4), torch.randn(1, 3, 4), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be bool"):
        masked_cosine_loss(torch.randn(3, 4), torch.randn(1, 3, 4), torch.ones(1, 3))


def test_lr_warms_up_linearly_then_follows_a_cosine_to_min_lr():
    lr = lambda s: lr_at_step(s, peak_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)  # noqa: E731
    assert [lr(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)
    decay = [lr(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_steps_come_from_epochs_unless_given():
    assert plan_steps(
        total_steps=0, epochs=150, warmup_steps=0, warmup_epochs=2, dataset_size=30_000_000, global_batch_size=4096
    ) == (math.ceil(150 * 30_000_000 / 4096), round(2 * 30_000_000 / 4096))
    assert plan_steps(
        total_steps=50, epochs=150, warmup_steps=5, warmup_epochs=2, dataset_size=10, global_batch_size=4
    ) == (50, 5)
    assert plan_steps(
        total_steps=3, epochs=1, warmup_steps=10, warmup_epochs=0, dataset_size=10, global_batch_size=4
    ) == (3, 3)


@pytest.mark.parametrize("mode", ["mim", "mae"])
def test_no_weight_decay_on_biases_norms_positions_and_tokens(mode):
    from eva_train.models import build_model

    model = build_model(
        ModelConfig(variant="eva_debug_p4", img_size=16, mode=mode, decoder_depth=1, decoder_width=16, decoder_heads=2),
        teacher_dim=8,
    )
    decay, no_decay = param_groups(model, weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"cls_token", "pos_embed", "mask_token" if mode == "mim" else "decoder_pos_embed"} <= exempt
    assert "blocks.0.attn.qkv.weight" in decayed or "blocks.0.attn.q_proj.weight" in decayed
    assert all(n.endswith(("bias", "cls_token", "pos_embed", "mask_token")) or "norm" in n for n in exempt)
    assert all(model.get_parameter(n).ndim == 2 or n.endswith("patch_embed.proj.weight") for n in decayed)
    assert len(exempt) + len(decayed) == len(names)


def test_param_groups_use_ds_shape_of_partitioned_parameters():
    layer = torch.nn.Linear(4, 4)
    layer.weight.data = torch.empty(0)  # what ZeRO-3 leaves in the module
    layer.weight.ds_shape = torch.Size([4, 4])
    decay, no_decay = param_groups(layer, 0.1)
    assert decay["params"] == [layer.weight] and no_decay["params"] == [layer.bias]


def test_student_normalization_is_imagenet():
    images = torch.tensor([[[[0]], [[255]], [[124]]]], dtype=torch.uint8)  # (1,3,1,1)
    out = normalize_images(images, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    expected = torch.tensor([-0.485 / 0.229, (1 - 0.456) / 0.224, (124 / 255 - 0.406) / 0.225])
    assert torch.allclose(out.float().flatten(), expected, atol=2e-2)


def test_peak_flops_by_device_name():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA GH200 480GB", "bf16") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp16") == 312e12
    assert peak_flops("cpu", "bf16") is None and peak_flops("NVIDIA H100", "fp32") is None


def test_meter_gives_mfu_only_with_a_known_peak():
    meter = ThroughputMeter()
    meter.add(images=64, data_wait_s=0.0)
    assert meter.read(1e9, None, 2)["mfu"] is None
    read = meter.read(1e9, 1e12, 2)
    assert read["mfu"] == pytest.approx(1e9 * read["images_per_sec"] / 2e12, rel=1e-3)
    assert 0 <= read["data_wait_frac"] <= 1


def test_wandb_is_offline_without_credentials():
    assert wandb_mode({}) == "offline"
    assert wandb_mode({"WANDB_API_KEY": "k"}) == "online"
    assert wandb_mode({"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}) == "offline"
    assert wandb_mode({"WANDB_MODE": "disabled"}) == "disabled"


def test_rank_environment_from_slurm_and_for_a_lone_process():
    env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}
    info = world_from_env(env)
    assert (info.rank, info.local_rank, info.world_size) == (3, 1, 4) and env["RANK"] == "3"
    env = {"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "MASTER_ADDR": "a", "MASTER_PORT": "1"}
    assert world_from_env(env).rank == 0  # the launcher's RANK wins over SLURM's
    lone = {}
    assert world_from_env(lone).world_size == 1 and "MASTER_PORT" in lone
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        world_from_env({"RANK": "0", "WORLD_SIZE": "2"})


def test_metrics_sink_writes_jsonl_and_offline_wandb(tmp_path, monkeypatch):
    from eva_train.config import LoggingConfig
    from eva_train.train.metrics import MetricsSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    sink = MetricsSink(
        str(tmp_path),
        LoggingConfig(wandb=True, progress_bar=True),
        {"recipe": "t"},
        rank=0,
        total_steps=2,
        start_step=0,
    )
    for step in (1, 2):
        sink.advance()
        sink.write({"step": step, "loss": -0.5 * step, "lr": 1e-3, "mfu": None})
    sink.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [__import__("json").loads(line)["step"] for line in lines] == [1, 2]
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline wandb run was written"
    silent = MetricsSink(str(tmp_path / "r1"), LoggingConfig(), {}, rank=1, total_steps=2, start_step=0)
    silent.write({"step": 1})
    assert not (tmp_path / "r1" / "metrics.jsonl").exists()  # only rank 0 writes


def test_resume_moves_metrics_logged_past_the_checkpoint_aside(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    trim_after(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    aside = (tmp_path / "metrics.abandoned.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in aside[:2]] == [4, 5] and aside[2] == '{"step": 6, "lo'
    trim_after(path, 3)  # nothing past step 3 any more: the file is left alone
    assert len((tmp_path / "metrics.abandoned.jsonl").read_text().splitlines()) == 3
