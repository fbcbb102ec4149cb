"""Stop signals outside SLURM, through the real entry point on 2 real DeepSpeed ranks: to one rank, or
to the whole process group (ranks and their DataLoader workers, as a terminal or a launcher's
killpg delivers it). Every case: both ranks exit 0 after one complete checkpoint at one agreed step."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import procs as helpers
from tests.helpers.procs import (
    PRETRAIN,
    REPO,
    free_port,
    launch_pretrain,
    metric_lines,
    rank_logs,
    wait_all,
    wait_until,
)

pytestmark = pytest.mark.slow
TOTAL_STEPS = 200  # never reached: the signal stops the run


@pytest.fixture(autouse=True)
def _patient_waits(monkeypatch):
    # Start-up alone (imports, DeepSpeed's comm op, the build) took minutes on a loaded 2-core box.
    monkeypatch.setattr(helpers, "RUN_TIMEOUT_S", 900)


def demo_args(demo_root: Path, workers: int):
    return [
        f"--data.demo_root={demo_root}",
        f"--data.num_workers={workers}",
        "--train.precision=fp32",
        "--train.micro_batch_size=4",
        "--train.global_batch_size=8",
        f"--train.total_steps={TOTAL_STEPS}",
        "--logging.log_every_steps=1",
        "--logging.wandb=false",
        "--logging.progress_bar=false",
        "--eval.final_report=false",
        "--checkpoint.every_steps=1000",
    ]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return tmp_path_factory.mktemp("signals_demo_data")


def launch_in_one_group(out: Path, args):
    """Both ranks in one new process group (rank 0 leads it): what a terminal or killpg reaches."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        WANDB_MODE="offline",
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    procs = []
    for rank in (0, 1):
        log = open(out / f"log_rank{rank}.txt", "a")
        procs.append(
            subprocess.Popen(
                [sys.executable, str(PRETRAIN), "--output_dir", str(out), *args],
                cwd=REPO,
                env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=procs[0].pid if procs else 0,
            )
        )
    return procs


def assert_stopped_with_one_checkpoint(out: Path, codes):
    assert codes == [0, 0], rank_logs(out)
    tag = (out / "checkpoints" / "latest").read_text().strip()
    record = json.loads((out / "checkpoints" / tag / "COMPLETE").read_text())
    assert record["world_size"] == 2 and 3 <= record["step"] < TOTAL_STEPS
    assert [p.name for p in (out / "checkpoints").glob("step_*")] == [tag]  # one save, by both ranks together
    assert metric_lines(out)[-1]["step"] == record["step"]
    logs = rank_logs(out, tail_chars=20000)
    assert "outside SLURM" in logs and "killed by signal" not in logs and "Traceback" not in logs
    return record["step"]


@pytest.mark.parametrize("signum, rank", [(signal.SIGTERM, 1), (signal.SIGUSR1, 0)])
def test_signal_to_one_rank_saves_at_an_agreed_step(demo_root, tmp_path, signum, rank):
    out = tmp_path / "run"
    procs = launch_pretrain(out, 2, demo_args(demo_root, workers=0))
    wait_until(lambda: len(metric_lines(out)) >= 3, procs, "three steps")
    procs[rank].send_signal(signum)
    assert_stopped_with_one_checkpoint(out, wait_all(procs, timeout_s=900))


def test_hangup_to_the_process_group_with_workers_saves_and_exits_zero(demo_root, tmp_path):
    out = tmp_path / "run"
    procs = launch_in_one_group(out, demo_args(demo_root, workers=1))
    wait_until(lambda: len(metric_lines(out)) >= 3, procs, "three steps")
    os.killpg(procs[0].pid, signal.SIGHUP)  # ranks and their DataLoader workers alike
    assert_stopped_with_one_checkpoint(out, wait_all(procs, timeout_s=900))
