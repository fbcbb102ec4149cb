"""Stop signals: turn SIGTERM / SIGUSR1 / SIGHUP into "finish this step, save, then requeue or stop, exit 0".

SLURM warns a job before it ends it: `--signal=B:USR1@GRACE` (sent to the batch shell, which
forwards it to the srun step as USR1), `--signal=TERM@GRACE` (to the tasks directly), SIGTERM at
the time limit, on preemption or on `scancel`, then SIGKILL after KillWait. The handler only
records the signal; the loop polls `agree()` once per step (one all-reduce) so that every rank
stops after the same step (a rank that stops alone hangs ZeRO-3's collectives) and saves.

Whether the job comes back is decided once, by rank 0, from SLURM's own view of the job
(`requeue_verdict`): a user's `scancel` or a TERM that SLURM did not send for a time limit or a
preemption stops the run for good; USR1 (the time-limit warning of our templates), a preemption
or the time limit requeue it; a finished run is never requeued. Rank 0 requeues only after the
run has closed its logs (`requeue`), since SLURM kills the job as soon as it is requeued.

Because the handler never raises, a second signal that arrives while the checkpoint is being
written is recorded and the save runs to completion (its atomic rename happens or not at all).
"""

import argparse
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime

log = logging.getLogger(__name__)

DEFAULT_SAVE_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGHUP")
# The signal our sbatch templates ask SLURM to send before the time limit (`--signal=B:USR1@N`) and
# the one the batch shell forwards: it always means "the allocation is ending, come back".
WARNING_SIGNAL = "SIGUSR1"
# A TERM/HUP this close to the job's EndTime is the time limit (SLURM signals up to 60 s early and
# sites configure `--signal=TERM@N` grace of a few minutes), not a user's request.
NEAR_END_S = 600
SLURM_QUERY_TIMEOUT_S = 30
REQUEUE_TIMEOUT_S = 60


def parse_signals(names: Sequence[str]) -> tuple[int, ...]:
    """["SIGTERM", "USR1", ...] -> signal numbers; ValueError naming an unknown or unusable one."""
    out = []
    for name in names:
        full = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
        if full not in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGINT", "SIGQUIT"):
            raise ValueError(
                f"train.save_signals: '{name}' is not a signal a job can save on; use any of "
                f"SIGTERM, SIGUSR1, SIGUSR2, SIGHUP, SIGINT, SIGQUIT"
            )
        out.append(int(getattr(signal, full)))
    return tuple(out)


class PreemptionHandler:
    """Records stop signals on this rank; `agree` makes all ranks stop at the same step."""

    def __init__(self, signals: Sequence = DEFAULT_SAVE_SIGNALS):
        self.signals = parse_signals([s if isinstance(s, str) else signal.Signals(s).name for s in signals])
        self.received: list[str] = []  # names of the signals that arrived on this rank, in order
        self.agreed_signals: list[str] = []  # names that arrived on any rank (after agree() said True)
        self._agreed = False

    def install(self) -> "PreemptionHandler":
        """Replace the handlers of `signals` (main thread only, as Python requires)."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "PreemptionHandler.install() must run in the main thread (Python only "
                "delivers signals there); call it from the training entry point"
            )
        for signum in self.signals:
            signal.signal(signum, self._on_signal)
        return self

    def ignore_from_now(self) -> None:
        """The run is over: ignore the signals until the process is gone. (Python puts back the default,
        fatal action of a handled signal while it shuts down, but leaves an ignored one ignored; a late
        USR1 would otherwise kill the rank with 138 and make the batch shell requeue a finished run.)"""
        for signum in self.signals:
            signal.signal(signum, signal.SIG_IGN)

    def _on_signal(self, signum: int, frame) -> None:
        # Only record: raising here could tear a checkpoint write in half.
        self.received.append(signal.Signals(signum).name)

    @property
    def requested(self) -> bool:
        """A stop signal arrived on this rank."""
        return bool(self.received)

    def agree(self, device=None) -> bool:
        """True on every rank once any rank has received a signal. Collective: call on all ranks, once per step.

        One all-reduce (MAX) of a flag per watched signal, so every rank also learns which signals
        arrived anywhere. `device` is where the flags live (the engine's device; CPU for gloo).
        Once agreed, stays agreed without further communication.
        """
        if self._agreed:
            return True
        flags = [1 if signal.Signals(s).name in self.received else 0 for s in self.signals]
        # No process group can exist unless torch.distributed was imported; skip the torch import then.
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            import torch

            tensor = torch.tensor(flags, dtype=torch.int32, device=device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            flags = tensor.tolist()
        self.agreed_signals = [signal.Signals(s).name for s, f in zip(self.signals, flags) if f]
        self._agreed = bool(self.agreed_signals)
        if self._agreed:
            log.warning(
                "stop agreed (signals on any rank: %s; on this rank: %s); saving after this step",
                ", ".join(self.agreed_signals),
                ", ".join(self.received) or "none",
            )
        return self._agreed

    def requeue(self) -> bool:
        """Rank 0, after the save and after logs are closed: requeue the SLURM job if SLURM should bring it back.
        Called only for a run that stopped early: a finished run never gets here.

        Returns True when the job was requeued. SLURM then ends the running job (TERM to every
        process) and restarts it under the same job id with SLURM_RESTART_COUNT+1.
        """
        job_id = os.environ.get("SLURM_JOB_ID")
        if not job_id:
            log.warning(
                "stopped on %s outside SLURM; resume by running the same command (--resume=auto)",
                ", ".join(self.agreed_signals or self.received) or "a signal",
            )
            return False
        requeue, why = requeue_verdict(query_job(job_id), self.agreed_signals or self.received)
        if not requeue:
            log.warning(
                "not requeueing SLURM job %s: %s; resume later with --resume=auto in the same output dir", job_id, why
            )
            return False
        log.warning("requeueing SLURM job %s: %s", job_id, why)
        return scontrol_requeue(job_id)


def query_job(job_id: str) -> dict[str, str]:
    """`scontrol show job -o ID` as a field dict; {} when SLURM does not answer."""
    try:
        done = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=SLURM_QUERY_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        log.error("`scontrol show job %s` failed (%s)", job_id, err)
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", done.stdout)) if done.returncode == 0 else {}


def _seconds_left(fields: dict[str, str], now: float) -> float | None:
    try:
        return datetime.strptime(fields.get("EndTime", ""), "%Y-%m-%dT%H:%M:%S").timestamp() - now
    except ValueError:  # "Unknown" (no time limit) or missing
        return None


def requeue_verdict(fields: dict[str, str], signals: Sequence[str], now: float | None = None) -> tuple[bool, str]:
    """(requeue?, why) from SLURM's fields of the job and the stop signals that arrived.

    Observed on SLURM 22.05: a user's `scancel` leaves JobState COMPLETING/CANCELLED with Reason
    None; the time limit COMPLETING/TIMEOUT with Reason TimeLimit; `scancel --signal=X` leaves the
    job RUNNING; preemption sets PreemptTime (and JobState PREEMPTED once it ends).
    """
    now = time.time() if now is None else now
    state, reason = fields.get("JobState", ""), fields.get("Reason", "")
    if not fields:
        return False, "SLURM did not answer `scontrol show job`; not requeueing blind"
    if state == "PREEMPTED" or fields.get("PreemptTime", "None") not in ("None", "", "Unknown"):
        return True, "the job is being preempted"
    if state == "TIMEOUT" or reason == "TimeLimit":
        return True, "the job reached its time limit"
    if state in ("CANCELLED", "COMPLETING", "COMPLETED", "FAILED"):
        return False, f"the job was cancelled (JobState {state}, no time-limit or preemption reason)"
    left = _seconds_left(fields, now)
    if left is not None and left <= NEAR_END_S:
        return True, f"the time limit is {max(left, 0):.0f} s away"
    if WARNING_SIGNAL in signals:
        return True, f"{WARNING_SIGNAL} is the time-limit warning (--signal=B:USR1@N)"
    return False, (
        f"{', '.join(signals) or 'the signal'} with the job still RUNNING and neither preempted nor "
        f"near its time limit is a request to stop (e.g. scancel --signal=TERM)"
    )


def scontrol_requeue(job_id: str) -> bool:
    cmd = ["scontrol", "requeue", job_id]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=REQUEUE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.error("`%s` failed (%s); resubmit the job to resume", " ".join(cmd), err)
        return False
    if done.returncode != 0:
        log.error(
            "`%s` exited %d: %s; resubmit the job to resume",
            " ".join(cmd),
            done.returncode,
            (done.stderr or done.stdout).strip(),
        )
        return False
    log.warning("requeued SLURM job %s", job_id)
    return True


def slurm_job_summary(environ: dict[str, str] | None = None) -> str:
    """One log line naming the SLURM job, its restart count and this task; '' outside SLURM."""
    env = os.environ if environ is None else environ
    if "SLURM_JOB_ID" not in env:
        return ""
    return (
        f"SLURM job {env['SLURM_JOB_ID']} restart {env.get('SLURM_RESTART_COUNT', '0')} "
        f"task {env.get('SLURM_PROCID', '?')}/{env.get('SLURM_NTASKS', '?')} "
        f"on {env.get('SLURMD_NODENAME', '?')}"
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m eva_train.train.preemption verdict JOB_ID SIGNAL`: the batch shell's question "requeue?",
    answered by the same rule as rank 0's. Prints the reason; exit 0 = requeue, 1 = do not."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("command", choices=["verdict"])
    parser.add_argument("job_id")
    parser.add_argument("signals", nargs="*")
    args = parser.parse_args(argv)
    names = [s.upper() if s.upper().startswith("SIG") else "SIG" + s.upper() for s in args.signals]
    requeue, why = requeue_verdict(query_job(args.job_id), names)
    print(why)
    return 0 if requeue else 1


if __name__ == "__main__":
    sys.exit(main())
