"""Stall watchdog: a rank that makes no progress for `timeout_s` reports where it is stuck and exits.

A hung collective (one rank died, a NIC flapped, a rank ran a module one time too many under
ZeRO-3) otherwise burns the whole allocation until the time limit. The loop calls `beat(where)`
at each stage of a step; a daemon thread checks the age of the last beat and, past the timeout,
writes rank, host, pid, the last `where` and the Python stacks of all threads to stderr, then
`os._exit(STALL_EXIT_CODE)` (no cleanup that could hang too). srun's `--kill-on-bad-exit` then
stops the other ranks.

The checker thread needs the GIL. If native code holds the GIL forever, the thread cannot run,
so it keeps `faulthandler`'s C-level timer armed `backstop_s` ahead: that timer dumps all stacks
and exits the process without the GIL. One watchdog per process (faulthandler has one timer).
"""

import faulthandler
import os
import socket
import sys
import threading
import time
import traceback
from typing import TextIO

STALL_EXIT_CODE = 75
SAVE_TIMEOUT_S = 3600.0  # budget for one checkpoint save or reload (EVA-g's optimizer state is ~12 GB)


class StallWatchdog:
    def __init__(self, timeout_s: float, rank: int, backstop_s: float | None = None, stream: TextIO | None = None):
        if timeout_s <= 0:
            raise ValueError(f"StallWatchdog timeout_s={timeout_s} must be > 0 (leave the watchdog out to disable it)")
        self.timeout_s = float(timeout_s)
        self.rank = rank
        # The backstop fires only when the checker thread itself could not run.
        default_backstop_s = self.timeout_s + max(60.0, self.timeout_s / 2)
        self.backstop_s = max(float(backstop_s), self.timeout_s) if backstop_s is not None else default_backstop_s
        self.stream = stream or sys.stderr
        self._last: tuple[float, str, float] = (time.monotonic(), "start", self.timeout_s)
        self._beats = 0
        self._poll_s = min(1.0, self.timeout_s / 4)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "StallWatchdog":
        self._last = (time.monotonic(), "start", self.timeout_s)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"stall-watchdog-rank{self.rank}", daemon=True)
        self._thread.start()
        return self

    def beat(self, where: str, timeout_s: float | None = None) -> None:
        """Progress at `where`. `timeout_s` allows a longer budget until the next beat (e.g. a checkpoint save)."""
        self._last = (time.monotonic(), where, self.timeout_s if timeout_s is None else float(timeout_s))
        self._beats += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        faulthandler.cancel_dump_traceback_later()

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            beat_time, where, budget_s = self._last
            idle_s = time.monotonic() - beat_time
            if idle_s > budget_s:
                self._report_and_exit(where, idle_s)
            self._arm_backstop(budget_s - idle_s)

    def _arm_backstop(self, remaining_s: float) -> None:
        try:
            fileno = self.stream.fileno()
        except (AttributeError, OSError, ValueError):
            fileno = sys.__stderr__.fileno()
        # Two polls of slack so the backstop never beats a healthy checker.
        delay_s = max(remaining_s, 0.0) + self.backstop_s - self.timeout_s + 2 * self._poll_s
        faulthandler.dump_traceback_later(delay_s, repeat=False, file=fileno, exit=True)

    def _report_and_exit(self, where: str, idle_s: float) -> None:
        lines = [
            f"[stall watchdog] rank {self.rank} on {socket.gethostname()} pid {os.getpid()}: "
            f"no progress for {idle_s:.1f}s (timeout {self._last[2]:.1f}s); last beat #{self._beats} "
            f"at '{where}'. Exiting with code {STALL_EXIT_CODE} instead of hanging. Stacks:"
        ]
        names = {t.ident: t.name for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            if ident == threading.get_ident():
                continue  # the watchdog's own stack says nothing
            lines.append(f"--- thread {names.get(ident, ident)} ---")
            lines.append("".join(traceback.format_stack(frame)).rstrip())
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        finally:
            os._exit(STALL_EXIT_CODE)
