"""The real entry point (`eva_train/pretrain.py`, demo recipe, fp32 on CPU): SIGKILL a 2-rank run at a
random step, resume it (`--resume auto`), and compare metrics.jsonl with the run that never stopped;
resume a 2-rank checkpoint on 1 rank. The kill in the middle of a save is in tests/test_resume.py
(a tiny engine whose saves can be made slow enough to hit)."""

import random
from pathlib import Path

import pytest

from eva_train.train.plots import load_series, resume_steps
from tests.helpers.procs import kill_all, launch_pretrain, metric_lines, wait_ok, wait_until

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "eva_train" / "pretrain.py"
TOTAL_STEPS = 8

pytestmark = pytest.mark.slow


def overrides(demo_root: Path, *extra: str):
    # drop_path 0: a 1-rank resume cannot replay the 2 ranks' drop-path streams.
    return [
        f"--data.demo_root={demo_root}",
        "--data.num_workers=0",
        "--train.precision=fp32",
        f"--train.total_steps={TOTAL_STEPS}",
        "--logging.log_every_steps=1",
        "--logging.wandb=false",
        "--eval.final_report=false",
        "--logging.progress_bar=false",
        "--checkpoint.every_steps=2",
        "--checkpoint.keep_last=4",
        "--model.drop_path_rate=0",
        *extra,
    ]


def by_step(lines):
    return {line["step"]: line for line in lines}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return tmp_path_factory.mktemp("demo_data")


@pytest.fixture(scope="module")
def reference(demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain_reference")
    wait_ok(launch_pretrain(out, 2, overrides(demo_root)), out)
    lines = metric_lines(out)
    assert [line["step"] for line in lines] == list(range(1, TOTAL_STEPS + 1))
    return out, by_step(lines)


def test_sigkill_at_random_step_then_auto_resume_matches_bit_for_bit(demo_root, reference, tmp_path):
    _, ref = reference
    out = tmp_path / "run"
    kill_step = random.randint(3, TOTAL_STEPS - 1)
    print(f"kill at step >= {kill_step}")
    procs = launch_pretrain(out, 2, overrides(demo_root))
    wait_until(lambda: any(line["step"] >= kill_step for line in metric_lines(out)), procs, f"step {kill_step}")
    kill_all(procs)
    wait_ok(launch_pretrain(out, 2, overrides(demo_root, "--resume", "auto")), out)
    lines = metric_lines(out)  # steps logged past the last checkpoint before the kill were set aside
    assert [line["step"] for line in lines] == list(range(1, TOTAL_STEPS + 1))
    if (out / "metrics.abandoned.jsonl").exists():
        assert all(line["step"] > 2 for line in metric_lines(out, "metrics.abandoned.jsonl"))
    for line in lines:
        assert line["loss"] == ref[line["step"]]["loss"], f"step {line['step']}"
    # the pictures drawn at the end of the resumed run: one continuous loss curve, the resume marked
    assert (out / "plots" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert load_series(out)["loss"][0] == list(range(1, TOTAL_STEPS + 1))
    assert len(resume_steps(out)) == 1 and 0 < resume_steps(out)[0] < TOTAL_STEPS


def test_two_rank_checkpoint_resumes_on_one_rank(demo_root, reference, tmp_path):
    ref_out, ref = reference
    start = ref_out / "checkpoints" / "step_00000004"
    if not start.exists():  # retention kept other steps: take the oldest complete one
        start = sorted((ref_out / "checkpoints").glob("step_*"))[0]
    start_step = int(start.name.split("_")[1])
    out = tmp_path / "one_rank"
    wait_ok(launch_pretrain(out, 1, overrides(demo_root, "--resume", str(start))), out)
    lines = metric_lines(out)
    assert [line["step"] for line in lines] == list(range(start_step + 1, TOTAL_STEPS + 1))
    # The first step runs the loaded weights: only the reduction order differs (1 rank x 2 micro-batches
    # instead of 2 ranks), so fp32 rounding. Later steps: Adam (eps 1e-6) divides by sqrt(v), which
    # blows rounding differences of tiny gradients up; a lost or misplaced optimizer shard moves the
    # loss by far more than 1e-3.
    first, *later = lines
    assert first["loss"] == pytest.approx(ref[first["step"]]["loss"], rel=1e-5, abs=1e-6)
    for line in later:
        assert line["loss"] == pytest.approx(ref[line["step"]]["loss"], rel=1e-3), f"step {line['step']}"
