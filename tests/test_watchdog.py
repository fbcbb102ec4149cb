"""StallWatchdog: real child processes that stall, beat, or hold the GIL."""
import subprocess
import sys
import textwrap

import pytest

from eva_train.watchdog import STALL_EXIT_CODE, StallWatchdog


def run_child(body: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    code = "import sys, time\nfrom eva_train.watchdog import StallWatchdog\n" + textwrap.dedent(body)
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
