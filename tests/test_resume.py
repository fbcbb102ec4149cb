"""Kill real 2-rank DeepSpeed runs (SIGKILL, also in the middle of a save), resume, and compare
the loss at every step with the run that never stopped; resume a 2-rank checkpoint on 1 rank.

The ranks are plain processes with RANK/WORLD_SIZE/MASTER_* set (tests/helpers/resume_worker.py).
"""

import sys
from pathlib import Path

import pytest

from eva_train.runtime.checkpoint import read_complete, step_of_tag
from tests.helpers.procs import kill_all, launch_ranks, metric_lines, wait_ok, wait_until

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "helpers" / "resume_worker.py"

pytestmark = pytest.mark.slow


def launch(out: Path, world_size: int, *args: str):
    return launch_ranks(out, world_size, [sys.executable, WORKER, "--out", out, *args])


def assert_same_as_reference(lines, reference, total_steps: int) -> None:
    """Every logged step, before and after each kill, equals the uninterrupted run bit for bit."""
    assert {line["step"] for line in lines} == set(range(1, total_steps + 1))
    for line in lines:
        ref = reference[line["step"]]
        assert line["first_sample"] == ref["first_sample"], f"step {line['step']} read other samples"
        assert line["loss"] == ref["loss"], f"step {line['step']}: loss {line['loss']!r} != {ref['loss']!r}"


def tags(out: Path):
    return sorted(p.name for p in (out / "checkpoints").iterdir() if step_of_tag(p.name) is not None)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 2-rank ZeRO-3 run with dropout: {step: metrics line}."""
    out = tmp_path_factory.mktemp("reference")
    wait_ok(launch(out, 2, "--total_steps", "8", "--every_steps", "2", "--keep_every", "4"), out)
    lines = metric_lines(out)
    assert [line["step"] for line in lines] == list(range(1, 9))
    return out, {line["step"]: line for line in lines}


def test_retention_keeps_last_k_and_every_mth(reference):
    out, _ = reference
    # every 2 steps, keep_last 2, keep_every 4: steps 2 pruned, 4 permanent, 6 and 8 newest.
    assert tags(out) == ["step_00000004", "step_00000006", "step_00000008"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    record = read_complete(out / "checkpoints" / "step_00000008")
    assert record["step"] == 8 and record["world_size"] == 2 and record["zero_stage"] == 3


def test_sigkill_during_save_resumes_from_previous_checkpoint_bit_exact(reference, tmp_path):
    _, ref = reference
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    # Slow saves; SIGKILL both ranks while step 4 is being written (its files exist, no COMPLETE).
    procs = launch(out, 2, "--total_steps", "8", "--every_steps", "2", "--slow_save_s", "3")
    wait_until(
        lambda: (
            read_complete(ckpts / "step_00000002") is not None
            and any((ckpts / "step_00000004").glob("*model_states.pt"))
            and read_complete(ckpts / "step_00000004") is None
        ),
        procs,
        "the save of step 4 to start",
    )
    kill_all(procs)
    assert read_complete(ckpts / "step_00000004") is None
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    # Resume (auto: from step 2) to the end. A kill at a random step of the real entry point is in
    # tests/test_resume_pretrain.py.
    wait_ok(launch(out, 2, "--total_steps", "8", "--every_steps", "2"), out)
    assert_same_as_reference(metric_lines(out), ref, 8)
    assert all(read_complete(ckpts / tag) is not None for tag in tags(out)), f"incomplete save left: {tags(out)}"
    assert not [p for p in ckpts.iterdir() if ".abandoned-" in p.name], "an unfinished save was set aside, not deleted"
    assert (ckpts / "latest").read_text().strip() == "step_00000008"


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_world_size_change_two_to_one_to_two_ranks(tmp_path, zero_stage):
    # No dropout: 1 rank cannot replay 2 ranks' dropout streams; everything else must carry over.
    # ZeRO-3 (the recipes' stage) and ZeRO-1 (ZeRO-2 passes too with --zero_stage 2).
    common = ["--every_steps", "3", "--keep_last", "3", "--dropout", "0", "--zero_stage", str(zero_stage)]
    two = tmp_path / "two_ranks"
    wait_ok(launch(two, 2, "--total_steps", "8", *common), two)
    ref = {line["step"]: line for line in metric_lines(two)}
    one = tmp_path / "one_rank"
    wait_ok(launch(one, 1, "--total_steps", "6", *common, "--resume", str(two / "checkpoints" / "step_00000003")), one)
    back = tmp_path / "two_again"
    wait_ok(
        launch(back, 2, "--total_steps", "8", *common, "--resume", str(one / "checkpoints" / "step_00000006")), back
    )
    lines = metric_lines(one) + metric_lines(back)
    assert [line["step"] for line in lines] == [4, 5, 6, 7, 8]
    for line in lines:
        assert line["first_sample"] == ref[line["step"]]["first_sample"]
        # The reduction order changes with the world size: equal to fp32 rounding, not bit for bit.
        assert line["loss"] == pytest.approx(ref[line["step"]]["loss"], rel=1e-5, abs=1e-7)
    assert (two / "checkpoints" / "step_00000003" / "universal").is_dir()
    assert read_complete(one / "checkpoints" / "step_00000006")["world_size"] == 1
