"""Preemption: turn SIGUSR1 / SIGTERM into "finish this step, save, requeue, exit 0".

SLURM warns a job before it ends it: `--signal=B:USR1@GRACE` (sent to the batch shell, which
forwards it to the srun step), SIGTERM at the time limit or on preemption, then SIGKILL after
KillWait. The handler only records the signal; the training loop polls `agree()` once per step
so that every rank stops after the same step (a rank that stops alone hangs ZeRO-3's
collectives), saves a checkpoint, and rank 0 calls `requeue()`.

Because the handler never raises, a second signal that arrives while the checkpoint is being
written is recorded and the save runs to completion (its atomic rename happens or not at all).
"""
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Dict, List, Optional, Sequence

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
REQUEUE_TIMEOUT_S = 60


class PreemptionHandler:
    """Records preemption signals on this rank; `agree` makes all ranks stop at the same step."""

    def __init__(self, signals: Sequence[int] = DEFAULT_SIGNALS):
        self.signals = tuple(signals)
        self.received: List[str] = []       # names of the signals that arrived, in order
        self._previous: Dict[int, object] = {}
        self._agreed = False

    def install(self) -> "PreemptionHandler":
        """Replace the handlers of `signals` (main thread only, as Python requires)."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler.install() must run in the main thread (Python only "
                               "delivers signals there); call it from the training entry point")
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame) -> None:
        # Only record: raising here could tear a checkpoint write in half.
        self.received.append(signal.Signals(signum).name)

    @property
    def requested(self) -> bool:
        """A preemption signal arrived on this rank."""
        return bool(self.received)

    def agree(self, device=None) -> bool:
        """True on every rank once any rank has received a signal. Collective: call on all ranks, once per step.

        `device` is where the one-element flag lives for the all-reduce (the engine's device; CPU
        for gloo). Once agreed, stays agreed without further communication.
        """
        if self._agreed:
            return True
        # No process group can exist unless torch.distributed was imported; skip the torch import then.
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            import torch

            flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self._agreed = bool(flag.item())
        else:
            self._agreed = self.requested
        if self._agreed:
            log.warning("preemption agreed (signals on this rank: %s); stopping after this step",
                        ", ".join(self.received) or "none")
        return self._agreed

    def requeue(self) -> bool:
        """Rank 0: put this SLURM job back in the queue. Outside SLURM a no-op with a log line.

        Returns True when the job was requeued. SLURM then ends the running job (SIGTERM, which
        this handler records) and restarts it under the same job id with SLURM_RESTART_COUNT+1.
        """
        job_id = os.environ.get("SLURM_JOB_ID")
        if not job_id:
            log.warning("preemption: not inside a SLURM job (no SLURM_JOB_ID); not requeueing, "
                        "resume by running the same command with --resume=auto")
            return False
        cmd = ["scontrol", "requeue", job_id]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=REQUEUE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as err:
            log.error("preemption: `%s` failed (%s); resubmit the job to resume", " ".join(cmd), err)
            return False
        if done.returncode != 0:
            log.error("preemption: `%s` exited %d: %s; resubmit the job to resume",
                      " ".join(cmd), done.returncode, (done.stderr or done.stdout).strip())
            return False
        log.warning("preemption: requeued SLURM job %s", job_id)
        return True


def slurm_job_summary(environ: Optional[Dict[str, str]] = None) -> str:
    """One log line naming the SLURM job, its restart count and this task; '' outside SLURM."""
    env = os.environ if environ is None else environ
    if "SLURM_JOB_ID" not in env:
        return ""
    return (f"SLURM job {env['SLURM_JOB_ID']} restart {env.get('SLURM_RESTART_COUNT', '0')} "
            f"task {env.get('SLURM_PROCID', '?')}/{env.get('SLURM_NTASKS', '?')} "
            f"on {env.get('SLURMD_NODENAME', '?')}")
