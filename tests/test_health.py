"""Divergence guard parts that need no process group: the verdicts, the test-only fault hook, the
NaN-propagating backward factor, the sampler's skip, the checkpoint health marks and retention,
and the DeepSpeed settings the guard relies on."""

import itertools
import json
import math

import pytest
import torch

from eva_train.config import CheckpointConfig, ConfigError, TrainConfig, build_config
from eva_train.data.sampler import ResumableSampler
from eva_train.runtime.checkpoint import (
    COMPLETE_FILE,
    CheckpointManager,
    newest_complete,
    newest_healthy,
    read_complete,
)
from eva_train.train.engine import _nan_unless_finite, build_ds_config
from eva_train.train.faults import FaultPlan, parse
from eva_train.train.health import DivergenceGuard

OK = dict(loss_finite=True, grads_finite=True, loss_scale=1.0)


def test_k_consecutive_non_finite_steps_stop_and_a_finite_step_ends_the_streak():
    guard = DivergenceGuard(TrainConfig(max_bad_steps=3))
    nan = dict(loss_finite=False, grads_finite=False, loss_scale=1.0)
    assert guard.observe(1, -0.5, **OK).action == "" and guard.may_save()
    first = guard.observe(2, math.nan, **nan)
    assert first.bad and first.skipped and first.action == "" and not guard.may_save()
    assert guard.observe(3, math.nan, **nan).action == ""
    assert guard.observe(4, -0.5, **OK).action == "" and guard.may_save()  # streak over
    verdicts = [guard.observe(s, math.nan, **nan).action for s in (5, 6, 7)]
    assert verdicts == ["", "", "stop"] and guard.streak_start == 5 and guard.skipped_steps == 5


def test_finite_loss_with_overflowing_gradients_is_bad_only_without_a_loss_scale_to_blame():
    guard = DivergenceGuard(TrainConfig(max_bad_steps=1))
    scale_search = guard.observe(1, -0.5, loss_finite=True, grads_finite=False, loss_scale=65536.0)  # fp16
    assert scale_search.skipped and not scale_search.bad and guard.skipped_steps == 1 and guard.may_save()
    assert guard.observe(2, -0.5, loss_finite=True, grads_finite=False, loss_scale=1.0).action == "stop"


def test_spike_needs_a_full_window_then_patience_then_asks_for_a_reload():
    guard = DivergenceGuard(TrainConfig(spike_factor=2.0, spike_window=3, spike_patience=2))
    assert not guard.observe(1, 5.0, **OK).spike  # window not full yet: never a spike
    for step, loss in zip((2, 3, 4), (-0.5, -0.6, -0.5)):  # distances 0.5, 0.4, 0.5
        assert not guard.observe(step, loss, **OK).spike
    assert guard.recent == pytest.approx([0.5, 0.4, 0.5])
    assert not guard.observe(5, -0.1, **OK).spike  # 0.9 <= 2 x median 0.5: normal
    first = guard.observe(6, 0.5, **OK)  # 1.5 > 2 x 0.5
    assert first.spike and first.action == "" and not guard.may_save()
    assert guard.observe(7, 0.9, **OK).action == "reload" and guard.streak_start == 6
    assert guard.recent == pytest.approx([0.4, 0.5, 0.9])  # spikes never enter the statistic
    guard.spike_handled()
    assert guard.may_save() and guard.spike_reloads == 1


def test_guard_state_survives_a_round_trip_and_spikes_are_off_by_default():
    guard = DivergenceGuard(TrainConfig(spike_factor=2.0, spike_window=2))
    guard.observe(1, -0.5, **OK)
    guard.observe(2, math.nan, loss_finite=False, grads_finite=False, loss_scale=1.0)
    saved = json.loads(json.dumps(guard.state_dict()))  # as it travels in the checkpoint
    restored = DivergenceGuard(TrainConfig(spike_factor=2.0, spike_window=2), saved)
    assert restored.state_dict() == guard.state_dict() and restored.skipped_steps == 1
    off = DivergenceGuard(TrainConfig())
    for step in range(1, 60):
        assert not off.observe(step, 0.99 if step > 55 else -0.99, **OK).spike


def test_fault_spec_parses_ranks_and_ranges_and_names_a_bad_entry():
    assert parse("nan_loss@3,5-6;loss_spike@8:1", rank=1) == {
        3: {"nan_loss"},
        5: {"nan_loss"},
        6: {"nan_loss"},
        8: {"loss_spike"},
    }
    assert parse("loss_spike@8:1", rank=0) == {}
    with pytest.raises(ValueError, match="bad entry 'nan@3'"):
        parse("nan@3", rank=0)


def test_faults_fire_once_per_step():
    plan = FaultPlan(rank=0, spec="nan_loss@2;loss_spike@3")
    loss = torch.tensor(-0.5)
    assert plan.apply(1, loss) == loss and math.isnan(plan.apply(2, loss))
    assert plan.apply(3, loss).item() == pytest.approx(0.5 * 20 - 1)
    plan.step_done(2)
    plan.step_done(3)
    assert plan.apply(2, loss) == loss and plan.apply(3, loss) == loss


def test_a_non_finite_loss_makes_every_gradient_nan_and_a_finite_one_is_untouched():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    out = layer(x)
    loss = out[0, 0] * math.inf + out[1:].sum()  # inf through one element only
    (loss * _nan_unless_finite(loss)).backward()
    assert all(torch.isnan(p.grad).all() for p in layer.parameters())
    layer.zero_grad()
    finite = layer(x).square().mean()
    (finite * _nan_unless_finite(finite)).backward()
    reference = torch.autograd.grad(layer(x).square().mean(), list(layer.parameters()))
    assert all(torch.equal(p.grad, r) for p, r in zip(layer.parameters(), reference))


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_sampler_skip_drops_a_range_and_a_resume_from_a_later_state_continues_exactly():
    length = 50
    stream = take(ResumableSampler(length, rank=0, world_size=1, seed=3), 120)
    sampler = ResumableSampler(length, rank=0, world_size=1, seed=3)
    assert take(sampler, 10) == stream[:10]
    state = sampler.skip(30, global_samples_consumed=10)  # drop positions 10..39
    assert (state["epoch"], state["position"], state["skipped_samples"]) == (0, 40, 30)
    assert take(sampler, 25) == stream[40:65]  # crosses into epoch 1
    later = sampler.state_after(10 + 25)
    assert (later["epoch"], later["position"], later["skipped_samples"]) == (1, 15, 30)
    resumed = ResumableSampler(length, rank=0, world_size=1, seed=3, state=later)
    assert take(resumed, 20) == stream[65:85]
    assert resumed.state_after(5)["skipped_samples"] == 30  # the count travels on


def test_sampler_skip_back_before_the_start_of_this_run():
    """A reload to a checkpoint older than this run's start: the consumed count is negative."""
    stream = take(ResumableSampler(40, rank=0, world_size=2, seed=1), 30)
    start = ResumableSampler(40, rank=0, world_size=2, seed=1).state_after(8)
    sampler = ResumableSampler(40, rank=0, world_size=2, seed=1, state=start)
    # this run began at global position 8; it went back to position 4 and skips the 8 samples to 12
    state = sampler.skip(8, global_samples_consumed=-4)
    assert state["position"] == 12 and take(sampler, 3) == stream[6:9]


def _fake_checkpoint(root, step, **record):
    tag = root / f"step_{step:08d}"
    tag.mkdir(parents=True)
    (tag / COMPLETE_FILE).write_text(json.dumps({"step": step, "world_size": 1, **record}) + "\n")
    return tag


def test_retention_keeps_the_newest_confirmed_checkpoint_until_a_newer_one_is_confirmed(tmp_path):
    manager = CheckpointManager(str(tmp_path), CheckpointConfig(keep_last=1, resume="none"), rank=0, world_size=1)
    root = manager.root
    _fake_checkpoint(root, 2, healthy=True, confirmed=True)
    _fake_checkpoint(root, 4, healthy=True, confirmed=True)
    new = _fake_checkpoint(root, 6, healthy=True, confirmed=False)
    manager._prune(keep=new)  # as right after saving step 6
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000004", "step_00000006"]
    manager.unconfirmed = new
    manager.settle(True)
    assert read_complete(new)["confirmed"] is True
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000006"]


def test_a_rejected_checkpoint_is_never_resumed_from_nor_counted_by_keep_last(tmp_path):
    manager = CheckpointManager(str(tmp_path), CheckpointConfig(keep_last=1, resume="none"), rank=0, world_size=1)
    root = manager.root
    good = _fake_checkpoint(root, 2, healthy=True, confirmed=True)
    blown = _fake_checkpoint(root, 3, healthy=True, confirmed=False)
    (root / "latest").write_text(blown.name + "\n")
    manager.unconfirmed = blown
    manager.settle(False, "every step run from its weights (4-6) was non-finite")
    record = read_complete(blown)
    assert record["healthy"] is False and "4-6" in record["unhealthy_reason"]
    assert newest_complete(root) == good and newest_healthy(root) == good
    assert newest_healthy(root, before_step=2) is None
    manager._prune(keep=_fake_checkpoint(root, 8, healthy=True, confirmed=False))
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002", "step_00000008"]


def test_older_checkpoints_without_health_keys_count_as_confirmed(tmp_path):
    root = tmp_path / "checkpoints"
    legacy = _fake_checkpoint(root, 5)
    assert newest_complete(root) == legacy


def test_deepspeed_settings_that_would_apply_a_nan_step_are_refused(tmp_path):
    for raw, match in (
        ({"zero_optimization": {"stage": 0}}, "stage=0"),
        ({"zero_optimization": {"stage": 2}, "bf16": {"check_grad_overflow": False}}, "check_grad_overflow"),
        ({"zero_optimization": {"stage": 1, "compute_grad_norm": False}}, "compute_grad_norm"),
    ):
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(raw))
        cfg = build_config("demo", [f"--train.deepspeed_config={path}", "--train.precision=bf16"])
        with pytest.raises(ConfigError, match=match):
            build_ds_config(cfg, world_size=1)


def test_guard_settings_are_range_checked():
    from eva_train.config import check_ranges, validate

    cfg = build_config("demo", ["--train.max_bad_steps=0"])
    with pytest.raises(ConfigError, match="train.max_bad_steps"):
        check_ranges(cfg)
    with pytest.raises(ConfigError, match="spike_factor=0.5 would call ordinary steps spikes"):
        validate(build_config("demo", ["--train.spike_factor=0.5"]))
    assert TrainConfig().spike_factor == 0.0 and TrainConfig().max_bad_steps == 3  # spikes off by default
