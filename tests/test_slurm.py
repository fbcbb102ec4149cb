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
from eva_train.train.preemption import PreemptionHandler, slurm_job_summary
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


# --- the sbatch scripts with the real entry point -------------------------------------------

needs_entry_point = pytest.mark.skipif(not (REPO / "eva_train/pretrain.py").exists(),
                                       reason="eva_train/pretrain.py (engine part) is not in the tree yet")
CPU_SHAPE = {"NODES": "1", "TASKS_PER_NODE": "2", "GPUS_PER_NODE": "0"}
CPU_SBATCH = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]
TOTAL_STEPS = 12
VAL_SMALL = "val_small.arrow"


def demo_overrides(demo_root: Path) -> str:
    """A 2-rank fp32 CPU demo that takes well under a minute; checkpoints only on preemption."""
    return " ".join([
        f"--data.demo_root={demo_root}", f"--data.val_index={demo_root / VAL_SMALL}", "--data.num_workers=0", "--train.precision=fp32",
        "--train.micro_batch_size=4", "--train.global_batch_size=8", "--optim.warmup_steps=2",
        f"--train.total_steps={TOTAL_STEPS}", "--logging.log_every_steps=1", "--logging.wandb=false", "--eval.final_report=false",
        "--logging.progress_bar=false", f"--checkpoint.every_steps={10 * TOTAL_STEPS}",
    ])


def read_metrics(output_dir: Path) -> List[dict]:
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def job_log(log_dir: Path, job_id: str) -> str:
    return "\n".join(p.read_text() for p in sorted(log_dir.glob(f"*-{job_id}.*")))


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """Demo images made once for both runs, plus a 16-image val index: the demo's 400-image val
    pass at the last step would otherwise cost more than the training steps."""
    import pyarrow as pa

    from eva_train.data.demo import ensure_demo_data
    from eva_train.data.index import read_metadata, write_index_atomic

    root = tmp_path_factory.mktemp("demo_data")
    _, val_index = ensure_demo_data(root)
    table = pa.ipc.open_file(pa.memory_map(str(val_index), "r")).read_all()
    meta = read_metadata(table.schema, str(val_index))
    (source,) = meta["sources"]  # the demo's val split is one source starting at row 0
    meta["sources"] = [dict(source, num_rows=16)]
    write_index_atomic(table.slice(0, 16), meta, str(root / VAL_SMALL))
    return root


@pytest.fixture(scope="module")
def uninterrupted_run(cluster, demo_root, tmp_path_factory):
    """`sbatch slurm/eva_g.sh` with CPU overrides: a 2-task demo pretraining run to the end."""
    root = tmp_path_factory.mktemp("uninterrupted")
    env = job_env(RECIPE="demo", OUTPUT_ROOT=str(root), EXTRA_ARGS=demo_overrides(demo_root))
    job_id = sbatch([*CPU_SBATCH, f"--output={root}/%x-%j.out", f"--error={root}/%x-%j.err",
                     "slurm/eva_g.sh"], env)
    try:
        fields = wait_job_ended(job_id, timeout_s=300)
    finally:
        subprocess.run(["scancel", job_id])
    return fields, root / f"eva-g-{job_id}", job_log(root, job_id)


@needs_entry_point
@pytest.mark.slow
def test_sbatch_eva_g_runs_demo_to_completion(uninterrupted_run):
    fields, output_dir, log = uninterrupted_run
    assert fields["JobState"] == "COMPLETED", log[-3000:]
    rows = read_metrics(output_dir)
    assert rows and rows[-1]["step"] == TOTAL_STEPS, log[-3000:]
    assert json.loads((output_dir / "config.json").read_text())  # the run folder is the job's own
    assert "2 tasks on" in log


@needs_entry_point
@pytest.mark.slow
def test_preempted_job_requeues_resumes_and_matches(cluster, demo_root, uninterrupted_run, tmp_path):
    env = job_env(RECIPE="demo", OUTPUT_ROOT=str(tmp_path), EXTRA_ARGS=demo_overrides(demo_root), **CPU_SHAPE)
    submit = subprocess.run(["bash", "slurm/eva_g.sh", "--submit", "--cpus-per-task=1", "--time=15",
                             f"--output={tmp_path}/%x-%j.out", f"--error={tmp_path}/%x-%j.err"],
                            capture_output=True, text=True, env=env, cwd=REPO)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = re.search(r"submitted job (\d+)", submit.stdout).group(1)
    output_dir = tmp_path / f"eva-g-{job_id}"
    try:
        deadline = time.monotonic() + 240
        while len(read_metrics(output_dir)) < 3:  # mid-run: a few steps done, most to go
            assert time.monotonic() < deadline and job_fields(job_id).get("JobState") not in ENDED, \
                job_log(tmp_path, job_id)[-3000:]
            time.sleep(0.2)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
        fields = wait_job_ended(job_id, timeout_s=300)
    finally:
        subprocess.run(["scancel", job_id])
    log = job_log(tmp_path, job_id)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", log[-3000:]
    assert f"job {job_id} restart 1" in log
    saved = sorted(p.name for p in (output_dir / "checkpoints").glob("step_*"))
    assert saved and int(saved[0].split("_")[1]) < TOTAL_STEPS  # the preemption checkpoint
    rows = read_metrics(output_dir)
    assert rows[-1]["step"] == TOTAL_STEPS
    expected = read_metrics(uninterrupted_run[1])[-1]["loss"]
    assert rows[-1]["loss"] == pytest.approx(expected, rel=1e-6, abs=1e-7)


@needs_entry_point
@pytest.mark.parametrize("env_update, message", [
    ({"EXTRA_ARGS": "--train.global_batch_size=3 --train.micro_batch_size=1"}, "not a multiple"),
    ({"DATA_INDEX": "/nonexistent/train.arrow"}, "does not exist"),
])
def test_dry_run_rejects_broken_config_without_queueing(cluster, tmp_path, env_update, message):
    before = set(queued_job_ids())
    env = job_env(RECIPE="demo", OUTPUT_ROOT=str(tmp_path), **CPU_SHAPE, **env_update)
    done = subprocess.run(["bash", "slurm/eva_g.sh", "--submit", "--time=15"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode != 0
    assert message in done.stderr + done.stdout
    assert "nothing was queued" in done.stderr
    assert "submitted job" not in done.stdout
    assert set(queued_job_ids()) <= before
