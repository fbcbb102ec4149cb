"""Real SLURM (tools/slurm_local.sh): the sbatch scripts, requeue, dry run, preemption end to end."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["slurm/eva_g.sh", "slurm/debug.sh", "slurm/launch.sh", "tools/slurm_local.sh"]
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")


@pytest.fixture(scope="module")
def cluster():
    """Skip (saying why) unless the local cluster answers; start it when we can."""
    if shutil.which("sbatch") is None and os.geteuid() != 0:
        pytest.skip("SLURM is not installed and we are not root; run `tools/slurm_local.sh start` as root")
    script = str(REPO / "tools/slurm_local.sh")
    if subprocess.run(["bash", script, "status"], capture_output=True).returncode != 0:
        start = subprocess.run(["bash", script, "start"], capture_output=True, text=True)
        if start.returncode != 0:
            pytest.skip(f"local SLURM could not start: {start.stderr.strip()[-300:]}")


def job_env(**extra: str) -> Dict[str, str]:
    """The job's environment: this interpreter, no SLURM variables leaking in from an outer job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHON=sys.executable, DS_ACCELERATOR="cpu", WANDB_MODE="offline")
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.update(extra)
    return env


def sbatch(args: List[str], env: Dict[str, str]) -> str:
    done = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def job_fields(job_id: str) -> Dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_job_ended(job_id: str, timeout_s: float) -> Dict[str, str]:
    """Poll until the job has ended for good (a requeued job passes through PENDING again)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fields = job_fields(job_id)
        if fields.get("JobState") in ENDED:
            return fields
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end in {timeout_s} s: {job_fields(job_id).get('JobState')}")


def queued_job_ids() -> List[str]:
    return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed; `apt-get install shellcheck` (tools/slurm_local.sh does)")
def test_scripts_pass_shellcheck():
    done = subprocess.run(["shellcheck", "-x", *SCRIPTS], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout


REQUEUE_ONCE = """
import os
from eva_train.preemption import PreemptionHandler, slurm_job_summary
print(slurm_job_summary(), flush=True)
if os.environ.get("SLURM_RESTART_COUNT", "0") == "0":  # unset on the first run
    assert PreemptionHandler().requeue()
    import time; time.sleep(60)  # SLURM ends this run; the requeued one takes over
print("second run done", flush=True)
"""


@pytest.mark.slow
def test_requeue_restarts_the_same_job(cluster, tmp_path):
    script = tmp_path / "requeue_once.py"
    script.write_text(REQUEUE_ONCE)
    log = tmp_path / "job.out"
    job_id = sbatch(["-n1", "--requeue", "--open-mode=append", f"--output={log}",
                     f"--wrap={sys.executable} {script}"], job_env())
    try:
        fields = wait_job_ended(job_id, timeout_s=120)
    finally:
        subprocess.run(["scancel", job_id])
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED", text
    assert fields["Restarts"] == "1"
    assert f"SLURM job {job_id} restart 0" in text and f"SLURM job {job_id} restart 1" in text
    assert "second run done" in text
