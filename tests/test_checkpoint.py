"""Fast checks of the checkpoint bookkeeping (no DeepSpeed): resume resolution, retention, config
errors, RNG round trip. The real saves/kills/resumes are in tests/test_resume.py."""

import json
import random

import numpy as np
import pytest
import torch

from eva_train.config import CheckpointConfig
from eva_train.runtime.checkpoint import (
    CheckpointError,
    CheckpointManager,
    check_checkpoint_config,
    newest_complete,
    resolve_checkpoint_path,
    retained_steps,
    step_of_tag,
    tag_for_step,
)
from eva_train.runtime.rng import capture_rng_state, restore_rng_state


def make_tag(root, step, complete=True, world_size=2):
    path = root / tag_for_step(step)
    path.mkdir(parents=True)
    (path / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (path / "COMPLETE").write_text(json.dumps({"step": step, "world_size": world_size}))
    return path


def test_tag_names_round_trip():
    assert tag_for_step(1200) == "step_00001200"
    assert step_of_tag("step_00001200") == 1200
    assert step_of_tag("step_00001200.abandoned-20260101T000000") is None
    assert step_of_tag("latest") is None


@pytest.mark.parametrize(
    "steps, keep_last, keep_every, expected",
    [
        ([2, 4, 6, 8], 2, 0, [6, 8]),
        ([2, 4, 6, 8], 2, 4, [4, 6, 8]),
        ([1000, 2000, 3000, 4000, 5000], 1, 2000, [2000, 4000, 5000]),
        ([5], 3, 0, [5]),
    ],
)
def test_retention_rule(steps, keep_last, keep_every, expected):
    assert retained_steps(steps, keep_last, keep_every) == expected


def test_auto_resume_uses_latest_when_complete(tmp_path):
    root = tmp_path / "checkpoints"
    make_tag(root, 2)
    make_tag(root, 4)
    (root / "latest").write_text("step_00000002\n")
    assert newest_complete(root) == root / "step_00000002"


def test_auto_resume_ignores_an_unfinished_save(tmp_path):
    root = tmp_path / "checkpoints"
    make_tag(root, 2)
    make_tag(root, 4, complete=False)
    (root / "latest").write_text("step_00000004\n")  # cannot happen by our writer, but must not be trusted
    manager = CheckpointManager(str(tmp_path), CheckpointConfig(), rank=0, world_size=1)
    assert manager.find_resume("auto") == str(root / "step_00000002")


def test_auto_resume_without_latest_takes_highest_complete(tmp_path):
    # A kill between writing COMPLETE and moving `latest`.
    root = tmp_path / "checkpoints"
    make_tag(root, 2)
    make_tag(root, 4)
    make_tag(root, 6, complete=False)
    assert newest_complete(root) == root / "step_00000004"


def test_auto_resume_of_a_fresh_run_and_none(tmp_path):
    manager = CheckpointManager(str(tmp_path), CheckpointConfig(), rank=0, world_size=1)
    assert manager.find_resume("auto") is None
    make_tag(tmp_path / "checkpoints", 2)
    assert manager.find_resume("none") is None


def test_resume_path_accepts_tag_checkpoints_or_output_dir(tmp_path):
    root = tmp_path / "checkpoints"
    make_tag(root, 2)
    tag = make_tag(root, 4)
    (root / "latest").write_text("step_00000004\n")
    assert resolve_checkpoint_path(tag) == tag
    assert resolve_checkpoint_path(root) == tag
    assert resolve_checkpoint_path(tmp_path) == tag


def test_resume_path_seeds_only_a_fresh_output_dir(tmp_path):
    other = make_tag(tmp_path / "other" / "checkpoints", 10)
    run = tmp_path / "run"
    manager = CheckpointManager(str(run), CheckpointConfig(), rank=0, world_size=1)
    assert manager.find_resume(str(other)) == str(other)
    own = make_tag(run / "checkpoints", 12)  # the run saved, was requeued with the same command line
    assert manager.find_resume(str(other)) == str(own)
    older_own = make_tag(run / "checkpoints", 4)
    assert manager.find_resume(str(older_own)) == str(older_own)  # an explicit rewind within the run


def test_resume_path_errors_name_the_fix(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint_path(tmp_path / "nope")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint_path(tmp_path)


def test_load_refuses_an_unfinished_save_before_touching_the_engine(tmp_path):
    tag = make_tag(tmp_path / "checkpoints", 4, complete=False)
    manager = CheckpointManager(str(tmp_path), CheckpointConfig(), rank=0, world_size=1)
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        manager.load(engine=None, path=str(tag))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("keep_last", 0, "keep_last=0"),
        ("every_steps", -1, "every_steps=-1"),
        ("keep_every", -5, "keep_every=-5"),
        ("resume", "/no/such/checkpoint", "does not exist"),
    ],
)
def test_bad_checkpoint_config_is_one_line_error(field, value, message):
    cfg = CheckpointConfig(**{field: value})
    with pytest.raises(CheckpointError, match=message) as err:
        check_checkpoint_config(cfg)
    assert "\n" not in str(err.value)


def test_due_every_n_steps():
    manager = CheckpointManager("unused", CheckpointConfig(every_steps=3), rank=0, world_size=1)
    assert [s for s in range(10) if manager.due(s)] == [3, 6, 9]
    never = CheckpointManager("unused", CheckpointConfig(every_steps=0), rank=0, world_size=1)
    assert not any(never.due(s) for s in range(10))


def draw_all():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_state_round_trip_through_a_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = draw_all()
    draw_all()
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))  # tensors + plain types
    assert draw_all() == expected


def test_rng_state_rejects_foreign_dicts():
    with pytest.raises(ValueError, match="capture_rng_state"):
        restore_rng_state({"torch": torch.get_rng_state()})
