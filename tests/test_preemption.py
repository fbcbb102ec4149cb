"""PreemptionHandler: real signals sent to real child processes (and two real gloo ranks)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eva_train.train.preemption import PreemptionHandler, parse_signals, requeue_verdict, slurm_job_summary

REPO = Path(__file__).resolve().parents[1]

# A toy training loop with the engine's order: step -> agree -> save -> requeue -> exit 0.
# It writes its progress to a file so the parent knows when to send the signal.
LOOP = """
import json, os, sys, time, logging
logging.basicConfig(level=logging.INFO)
from eva_train.train.preemption import PreemptionHandler
progress, save_path, save_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
handler = PreemptionHandler().install()

def atomic_save(step):
    tmp = save_path + ".tmp"
    with open(tmp, "w") as f:
        for i in range(10):  # a slow save, so a second signal can land inside it
            f.write(json.dumps({"step": step, "part": i}) + "\\n")
            f.flush()
            time.sleep(save_s / 10)
        os.fsync(f.fileno())
    os.replace(tmp, save_path)

for step in range(100000):
    time.sleep(0.05)  # the step's work
    with open(progress, "w") as f:
        f.write(str(step))
    if handler.agree():
        atomic_save(step)
        handler.requeue()
        print(json.dumps({"stopped_after": step, "signals": handler.received}))
        sys.exit(0)
sys.exit(1)
"""


def child_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def wait_for(predicate, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def start_loop(tmp_path, save_s):
    progress, saved = tmp_path / "progress", tmp_path / "ckpt.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-c", LOOP, str(progress), str(saved), str(save_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    wait_for(lambda: progress.exists() and progress.read_text().strip() not in ("", "0"))
    return proc, saved


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP])
def test_signal_finishes_step_saves_and_exits_zero(tmp_path, signum):
    proc, saved = start_loop(tmp_path, save_s=0.2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["signals"] == [signal.Signals(signum).name]
    rows = [json.loads(line) for line in saved.read_text().splitlines()]
    assert len(rows) == 10 and {r["step"] for r in rows} == {result["stopped_after"]}
    assert "outside SLURM" in err  # requeue outside SLURM: a no-op that says so


def test_second_signal_during_save_does_not_corrupt_it(tmp_path):
    proc, saved = start_loop(tmp_path, save_s=2.0)
    proc.send_signal(signal.SIGUSR1)
    tmp_file = Path(str(saved) + ".tmp")
    wait_for(tmp_file.exists)  # the save has begun
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["signals"][0] == "SIGUSR1" and len(result["signals"]) >= 2
    rows = [json.loads(line) for line in saved.read_text().splitlines()]
    assert [r["part"] for r in rows] == list(range(10))  # the whole file, not a torn one
    assert not tmp_file.exists()


# Two gloo ranks: only rank 1 gets the signal, both must stop after the same step.
RANKS = """
import json, os, sys, time
import torch.distributed as dist
from eva_train.train.preemption import PreemptionHandler
handler = PreemptionHandler().install()
dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=2)
progress = sys.argv[1] + os.environ["RANK"]
for step in range(100000):
    time.sleep(0.02)
    with open(progress, "w") as f:
        f.write(str(step))
    if handler.agree():
        break
print(json.dumps({"rank": dist.get_rank(), "step": step, "requested": handler.requested}))
dist.destroy_process_group()
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_agree_stops_all_ranks_at_the_same_step(tmp_path):
    env = child_env() | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANKS, str(tmp_path / "p")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env | {"RANK": str(r)},
        )
        for r in (0, 1)
    ]
    progress = tmp_path / "p1"
    wait_for(lambda: progress.exists() and progress.read_text().strip() not in ("", "0", "1", "2"))
    procs[1].send_signal(signal.SIGUSR1)
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["step"] == results[1]["step"]
    assert [r["requested"] for r in results] == [False, True]


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """A handler installed by a test must not outlive it (the process is pytest's)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_install_replaces_the_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    handler = PreemptionHandler().install()
    assert signal.getsignal(signal.SIGUSR1) != before
    os.kill(os.getpid(), signal.SIGUSR1)
    wait_for(lambda: handler.requested, timeout_s=5)
    assert handler.agree() is True  # no process group: this rank's own flag


def test_slurm_job_summary():
    assert slurm_job_summary({}) == ""
    line = slurm_job_summary(
        {
            "SLURM_JOB_ID": "42",
            "SLURM_RESTART_COUNT": "3",
            "SLURM_PROCID": "1",
            "SLURM_NTASKS": "2",
            "SLURMD_NODENAME": "n1",
        }
    )
    assert line == "SLURM job 42 restart 3 task 1/2 on n1"


def test_configured_signal_set_only():
    handler = PreemptionHandler(["SIGUSR1"]).install()
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # not watched: must stay as it was
    try:
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGUSR1)
        wait_for(lambda: handler.requested, timeout_s=5)
        assert handler.agree() and handler.agreed_signals == ["SIGUSR1"]
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert parse_signals(["TERM", "sigusr1"]) == (signal.SIGTERM, signal.SIGUSR1)
    with pytest.raises(ValueError, match="SIGKILL"):
        parse_signals(["SIGKILL"])


# What `scontrol show job -o` said on SLURM 22.05 in each case (tests/test_slurm.py runs them for real).
NOW = 1_800_000_000.0
FAR = "2099-12-01T00:00:00"


def _end_in(seconds: float) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(NOW + seconds).strftime("%Y-%m-%dT%H:%M:%S")


@pytest.mark.parametrize(
    "fields, signals, requeue",
    [
        ({"JobState": "COMPLETING", "Reason": "None", "PreemptTime": "None"}, ["SIGTERM"], False),  # plain scancel
        ({"JobState": "CANCELLED", "Reason": "None", "PreemptTime": "None"}, ["SIGUSR1"], False),
        ({"JobState": "COMPLETING", "Reason": "TimeLimit", "PreemptTime": "None"}, ["SIGTERM"], True),
        ({"JobState": "TIMEOUT", "Reason": "TimeLimit"}, ["SIGTERM"], True),
        ({"JobState": "RUNNING", "Reason": "None", "PreemptTime": "2026-01-01T00:00:00"}, ["SIGTERM"], True),
        ({"JobState": "PREEMPTED", "Reason": "None"}, ["SIGTERM"], True),
        ({"JobState": "RUNNING", "Reason": "None", "PreemptTime": "None", "EndTime": FAR}, ["SIGUSR1"], True),
        ({"JobState": "RUNNING", "Reason": "None", "PreemptTime": "None", "EndTime": FAR}, ["SIGTERM"], False),
        ({"JobState": "RUNNING", "Reason": "None", "PreemptTime": "None", "EndTime": "Unknown"}, ["SIGHUP"], False),
        ({"JobState": "RUNNING", "Reason": "None", "PreemptTime": "None", "EndTime": "near"}, ["SIGHUP"], True),
        ({}, ["SIGUSR1"], False),  # SLURM did not answer
    ],
)
def test_requeue_verdict(fields, signals, requeue):
    if fields.get("EndTime") == "near":
        fields = dict(fields, EndTime=_end_in(90))
    got, why = requeue_verdict(fields, signals, now=NOW)
    assert got is requeue, why
    assert why
