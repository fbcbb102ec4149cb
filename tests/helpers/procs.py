"""Launch real training processes as a launcher would (one process per rank, RANK/WORLD_SIZE/MASTER_* set), wait for
them, kill them, and read what they logged."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "eva_train" / "pretrain.py"
RUN_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(out: Path, world_size: int, command, env_extra=None):
    """`command` (a list) started once per rank, each in its own session, logging to OUT/log_rank{r}.txt."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        WANDB_MODE="offline",
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        **(env_extra or {}),
    )
    procs = []
    for rank in range(world_size):
        log = open(out / f"log_rank{rank}.txt", "a")
        procs.append(
            subprocess.Popen(
                [str(c) for c in command],
                env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    return procs


def launch_pretrain(out: Path, world_size: int, args, env_extra=None):
    """The real entry point, `eva_train/pretrain.py --output_dir OUT ARGS`, on `world_size` ranks."""
    return launch_ranks(out, world_size, [sys.executable, PRETRAIN, "--output_dir", out, *args], env_extra)


def wait_ok(procs, out: Path) -> None:
    codes = wait_all(procs)
    if codes != [0] * len(procs):
        pytest.fail(f"ranks exited with {codes}:\n{rank_logs(out)}")


def wait_all(procs, timeout_s: float = RUN_TIMEOUT_S):
    """Exit codes of every rank; ranks still running after `timeout_s` are killed."""
    deadline = time.time() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            kill_all(procs)
    return [proc.returncode for proc in procs]


def rank_logs(out: Path, tail_chars: int = 3000) -> str:
    return "\n".join(p.read_text()[-tail_chars:] for p in sorted(out.glob("log_rank*.txt")))


def kill_all(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    for proc in procs:
        proc.wait()


def wait_until(condition, procs, what: str) -> None:
    deadline = time.time() + RUN_TIMEOUT_S
    while not condition():
        if any(proc.poll() is not None for proc in procs):
            pytest.fail(f"the run ended before {what}")
        if time.time() > deadline:
            kill_all(procs)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def metric_lines(out: Path, name: str = "metrics.jsonl"):
    path = out / name
    if not path.exists():
        return []
    # A SIGKILL can cut the last line short: only whole lines count.
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]
