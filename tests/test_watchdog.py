"""StallWatchdog: real child processes that stall, beat, or hold the GIL."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from eva_train.train.watchdog import STALL_EXIT_CODE, StallWatchdog


def run_child(body: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    code = "import sys, time\nfrom eva_train.train.watchdog import StallWatchdog\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s)


def test_stalled_rank_reports_where_and_exits_nonzero():
    done = run_child("""
        def stuck_in_all_reduce():
            time.sleep(600)  # stands in for a collective that never returns
        wd = StallWatchdog(timeout_s=1.0, rank=5).start()
        wd.beat("step 3: backward")
        stuck_in_all_reduce()
        print("not reached")
    """)
    assert done.returncode == STALL_EXIT_CODE, done.stderr
    assert "rank 5" in done.stderr
    assert "step 3: backward" in done.stderr
    assert "stuck_in_all_reduce" in done.stderr  # the main thread's stack names the stuck function
    assert "not reached" not in done.stdout


def test_regular_beats_never_fire_and_stop_exits_cleanly():
    done = run_child("""
        wd = StallWatchdog(timeout_s=0.6, rank=0).start()
        for step in range(12):
            time.sleep(0.2)  # a 0.2 s step, well under the 0.6 s timeout
            wd.beat(f"step {step}")
        wd.stop()
        time.sleep(1.5)  # stopped: a long idle after stop must not fire
        print("finished")
    """)
    assert done.returncode == 0, done.stderr
    assert "finished" in done.stdout
    assert "stall watchdog" not in done.stderr


def test_longer_budget_for_one_interval():
    done = run_child("""
        wd = StallWatchdog(timeout_s=0.5, rank=0).start()
        wd.beat("checkpoint save", timeout_s=5.0)
        time.sleep(1.5)  # a slow save, longer than the step timeout, shorter than its own budget
        wd.beat("step 1")
        wd.stop()
        print("finished")
    """)
    assert done.returncode == 0, done.stderr
    assert "finished" in done.stdout


def test_backstop_fires_when_native_code_holds_the_gil():
    # re's matcher is C code that keeps the GIL: the checker thread cannot run, the C timer can.
    done = run_child("""
        import re
        wd = StallWatchdog(timeout_s=0.5, rank=2, backstop_s=2.0).start()
        wd.beat("step 0")
        time.sleep(0.2)  # let the checker arm the backstop once
        re.match(r"(a+)+$", "a" * 64 + "b")
    """)
    assert done.returncode != 0
    assert "most recent call first" in done.stderr  # faulthandler's dump


def test_bad_timeout_is_rejected():
    with pytest.raises(ValueError, match="timeout_s"):
        StallWatchdog(timeout_s=0, rank=0)


# Rank 1 skips a collective (as a rank that runs a module one time too few would under ZeRO-3);
# rank 0 blocks in all_reduce. Its watchdog must name the rank and the collective, and exit.
MISSED_COLLECTIVE = """
import os, sys, time
import torch, torch.distributed as dist
from eva_train.train.watchdog import StallWatchdog
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2)
wd = StallWatchdog(timeout_s=2.0, rank=rank).start()
wd.beat("step 7: grad all-reduce")
if rank == 0:
    dist.all_reduce(torch.ones(4))
else:
    time.sleep(30)  # never joins; the parent kills it once rank 0 has exited
"""


@pytest.mark.slow
def test_rank_stuck_in_collective_names_itself_and_exits():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MISSED_COLLECTIVE],
            env=env | {"RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        _, err = procs[0].communicate(timeout=90)
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert procs[0].returncode == STALL_EXIT_CODE, err
    assert "rank 0" in err and "step 7: grad all-reduce" in err
    assert "all_reduce" in err  # the stack shows the collective it is stuck in
