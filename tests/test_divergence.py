"""The divergence guard end to end: the real `eva_train/pretrain.py` (demo recipe, fp32, ZeRO-3, tiny) on
1-2 CPU ranks, with faults injected through the test-only EVA_FAULT_INJECT hook (eva_train/train/faults.py)
or a real blow-up (--optim.lr=1e30, the case that used to end "finished" with 6e29 weights kept)."""

import json
import math
from pathlib import Path

import pytest
import torch

from eva_train.runtime.checkpoint import newest_complete, read_complete
from tests.helpers.procs import launch_pretrain, wait_all

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "eva_train" / "pretrain.py"
RUN_TIMEOUT_S = 600
BATCH = 64  # the demo recipe's global batch

pytestmark = pytest.mark.slow


def run_pretrain(out: Path, world_size: int, demo_root: Path, *args: str, fault: str = ""):
    """Exit codes of the ranks (one process each, as torchrun or srun start them)."""
    quick = [
        f"--data.demo_root={demo_root}",
        "--data.num_workers=0",
        "--train.precision=fp32",
        "--model.drop_path_rate=0",
        "--logging.log_every_steps=1",
        "--logging.wandb=false",
        "--logging.progress_bar=false",
        "--eval.final_report=false",
    ]
    procs = launch_pretrain(out, world_size, [*quick, *args], env_extra={"EVA_FAULT_INJECT": fault})
    return wait_all(procs, RUN_TIMEOUT_S)


def logs(out: Path) -> str:
    return "\n".join(p.read_text()[-4000:] for p in sorted(out.glob("log_rank*.txt")))


def metrics(out: Path, name: str = "metrics.jsonl"):
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def tags(out: Path):
    return sorted(p.name for p in (out / "checkpoints").glob("step_*"))


def optimizer_shards(tag_dir: Path):
    # our own test run's DeepSpeed files (they hold DeepSpeed objects, not only tensors)
    return [
        torch.load(p, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        for p in sorted(tag_dir.glob("zero_pp_rank_*_optim_states.pt"))
    ]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return tmp_path_factory.mktemp("divergence_demo_data")


def test_one_nan_step_on_one_rank_is_skipped_by_every_rank_counted_and_survives_resume(demo_root, tmp_path):
    out = tmp_path / "run"
    common = ["--train.total_steps=6", "--checkpoint.every_steps=2", "--checkpoint.keep_last=2"]
    codes = run_pretrain(out, 2, demo_root, *common, "--train.max_steps_this_run=4", fault="nan_loss@3:1")
    assert codes == [0, 0], logs(out)
    assert run_pretrain(out, 2, demo_root, *common, "--resume", "auto") == [0, 0], logs(out)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 1]  # the count came back from the checkpoint
    assert rows[2]["loss"] != rows[2]["loss"] and rows[2]["grad_norm"] == float("inf")
    assert all(r["loss"] == r["loss"] for i, r in enumerate(rows) if i != 2)
    assert "step 3 skipped" in logs(out)
    # Adam took 5 steps on both ranks' partitions: the NaN step left weights and moments alone everywhere
    for shard in optimizer_shards(out / "checkpoints" / "step_00000006"):
        assert {float(s["step"]) for s in shard["optimizer_state_dict"]["state"].values()} == {5.0}
        assert all(torch.isfinite(t).all() for t in shard["fp32_flat_groups"])
    assert read_complete(out / "checkpoints" / "step_00000004")["confirmed"] is True


@pytest.mark.parametrize("ds_config, precision", [("zero1.json", "fp32"), ("zero2.json", "bf16")])
def test_nan_step_is_skipped_by_zero1_and_zero2_optimizers_too(demo_root, tmp_path, ds_config, precision):
    """Their skip paths differ from ZeRO-3's (bf16 checks overflow only when told to; the engine raises if a
    non-finite step was applied, so exit 0 means it was not)."""
    out = tmp_path / "run"
    codes = run_pretrain(
        out,
        1,
        demo_root,
        "--train.total_steps=3",
        "--checkpoint.every_steps=0",
        f"--deepspeed_config=ds_configs/{ds_config}",
        f"--train.precision={precision}",
        fault="nan_loss@2",
    )
    assert codes == [0], logs(out)
    rows = metrics(out)
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1] and rows[1]["grad_norm"] == float("inf")
    assert math.isfinite(rows[2]["loss"]) and math.isfinite(rows[2]["grad_norm"])


def test_consecutive_nan_steps_stop_with_exit_1_before_any_save_and_keep_the_newest_healthy(demo_root, tmp_path):
    out = tmp_path / "run"
    codes = run_pretrain(
        out,
        1,
        demo_root,
        "--train.total_steps=10",
        "--checkpoint.every_steps=1",
        "--checkpoint.keep_last=1",
        fault="nan_loss@4,5,6",
    )
    assert codes == [1], logs(out)
    text = logs(out)
    lines = [line for line in text.splitlines() if "training diverged" in line]
    assert len(lines) == 1 and "3 consecutive non-finite steps (4-6" in lines[0], text
    assert "step_00000002" in lines[0] and "Traceback" not in text
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]
    # nothing saved from step 4 on; keep_last=1, yet the newest confirmed checkpoint (2) survived, and the
    # one every later step failed from (3) is marked and never resumed from
    assert tags(out) == ["step_00000002", "step_00000003"]
    assert read_complete(out / "checkpoints" / "step_00000002")["confirmed"] is True
    assert read_complete(out / "checkpoints" / "step_00000003")["healthy"] is False
    assert newest_complete(out / "checkpoints").name == "step_00000002"


def test_huge_lr_blowup_stops_and_its_finite_but_blown_checkpoint_is_marked_unhealthy(demo_root, tmp_path):
    out = tmp_path / "run"
    codes = run_pretrain(
        out,
        1,
        demo_root,
        "--train.total_steps=10",
        "--checkpoint.every_steps=1",
        "--checkpoint.keep_last=2",
        "--optim.lr=1e30",
    )
    assert codes == [1], logs(out)
    assert "no healthy checkpoint was written" in logs(out)
    rows = metrics(out)
    assert rows[-1]["step"] == 4 and rows[-1]["skipped_steps"] == 3
    assert tags(out) == ["step_00000001"]  # no save after the blow-up
    blown = out / "checkpoints" / "step_00000001"
    weights = [t for shard in optimizer_shards(blown) for t in shard["fp32_flat_groups"]]
    assert all(torch.isfinite(t).all() for t in weights)  # a NaN scan would pass it...
    assert max(t.abs().max().item() for t in weights) > 1e20  # ...but the update blew it up
    assert read_complete(blown)["healthy"] is False and newest_complete(out / "checkpoints") is None


def test_loss_spike_reloads_the_last_good_checkpoint_skips_its_batches_and_resumes_exactly(demo_root, tmp_path):
    out = tmp_path / "run"
    spike = [
        "--train.total_steps=12",
        "--checkpoint.every_steps=2",
        "--checkpoint.keep_last=4",
        "--train.spike_factor=2",
        "--train.spike_window=3",
        "--train.spike_patience=2",
    ]
    assert run_pretrain(out, 2, demo_root, *spike, fault="loss_spike@6-7") == [0, 0], logs(out)
    text = logs(out)
    assert "loss spike at steps 6-7" in text and "reloaded" in text and "step_00000004" in text
    assert f"skipped the {3 * BATCH} samples" in text and f"position {7 * BATCH}" in text
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 13))  # the abandoned steps 5-7 were moved aside
    assert [r["step"] for r in metrics(out, "metrics.abandoned.jsonl")] == [5, 6, 7]
    assert [r["spike_reloads"] for r in rows] == [0] * 4 + [1] * 8
    assert [r["skipped_samples"] for r in rows] == [0] * 4 + [3 * BATCH] * 8
    assert max(r["loss"] for r in rows) < 0  # no spike on the timeline that was kept
    # a run resumed from a checkpoint after the reload continues exactly as the run did
    resumed = tmp_path / "resumed"
    codes = run_pretrain(resumed, 2, demo_root, *spike, "--resume", str(out / "checkpoints" / "step_00000010"))
    assert codes == [0, 0], logs(resumed)
    assert [(r["step"], r["loss"]) for r in metrics(resumed)] == [(r["step"], r["loss"]) for r in rows[10:]]
