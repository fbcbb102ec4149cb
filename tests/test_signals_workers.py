"""DataLoader workers ignore the job's signals (a TERM to the whole step must reach the rank's handler,
not kill its workers first); real forked workers, real signals."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A rank-like process: a handler that records TERM/USR1/HUP, a 2-worker loader built the way
# build_loader builds it, the job's signals sent to every worker and to itself, then more batches.
SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    import psutil, torch
    from eva_train.data.loader import JOB_SIGNALS, SignalSafeLoader, ignore_job_signals

    class Slow(torch.utils.data.Dataset):
        def __len__(self):
            return 64
        def __getitem__(self, i):
            time.sleep(0.01)
            return torch.tensor([i])

    got = []
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
        signal.signal(s, lambda signum, frame: got.append(signal.Signals(signum).name))
    loader = SignalSafeLoader(Slow(), batch_size=4, num_workers=2, worker_init_fn=ignore_job_signals,
                              persistent_workers=True)
    batches = iter(loader)
    first = next(batches)
    workers = psutil.Process().children()
    assert len(workers) == 2, workers
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
        for w in workers:
            os.kill(w.pid, s)
        os.kill(os.getpid(), s)  # the rank itself: its handler records it
    time.sleep(0.5)
    rest = [b for b in batches]
    assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    seen = sorted(int(x) for b in [first, *rest] for x in b)
    assert seen == list(range(64)), seen
    assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL)  # the parent's own handler
    assert not signal.pthread_sigmask(signal.SIG_BLOCK, []) & set(JOB_SIGNALS)  # nothing left blocked
    print("handled:", ",".join(got))
""")


def test_workers_survive_the_jobs_signals_and_the_rank_handles_them():
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "killed by signal" not in done.stderr
    assert done.stdout.strip() == "handled: SIGTERM,SIGUSR1,SIGHUP"
