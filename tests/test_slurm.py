"""Real SLURM (tools/slurm_local.sh): the sbatch scripts, requeue, dry run, preemption end to end."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

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


def job_env(**extra: str) -> dict[str, str]:
    """The job's environment: this interpreter, no SLURM variables leaking in from an outer job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHON=sys.executable, DS_ACCELERATOR="cpu", WANDB_MODE="offline")
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.update(extra)
    return env


def sbatch(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def job_fields(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_job_ended(job_id: str, timeout_s: float) -> dict[str, str]:
    """Poll until the job has ended for good (a requeued job passes through PENDING again)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fields = job_fields(job_id)
        if fields.get("JobState") in ENDED:
            return fields
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end in {timeout_s} s: {job_fields(job_id).get('JobState')}")


def queued_job_ids() -> list[str]:
    return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()


@pytest.mark.skipif(
    shutil.which("shellcheck") is None,
    reason="shellcheck is not installed; `apt-get install shellcheck` (tools/slurm_local.sh does)",
)
def test_scripts_pass_shellcheck():
    done = subprocess.run(["shellcheck", "-x", *SCRIPTS], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout


REQUEUE_ONCE = """
import os
from eva_train.train.preemption import scontrol_requeue, slurm_job_summary
print(slurm_job_summary(), flush=True)
if os.environ.get("SLURM_RESTART_COUNT", "0") == "0":  # unset on the first run
    assert scontrol_requeue(os.environ["SLURM_JOB_ID"])
    import time; time.sleep(60)  # SLURM ends this run; the requeued one takes over
print("second run done", flush=True)
"""


@pytest.mark.slow
def test_requeue_restarts_the_same_job(cluster, tmp_path):
    script = tmp_path / "requeue_once.py"
    script.write_text(REQUEUE_ONCE)
    log = tmp_path / "job.out"
    job_id = sbatch(
        ["-n1", "--requeue", "--open-mode=append", f"--output={log}", f"--wrap={sys.executable} {script}"], job_env()
    )
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

needs_entry_point = pytest.mark.skipif(
    not (REPO / "eva_train/pretrain.py").exists(), reason="eva_train/pretrain.py (engine part) is not in the tree yet"
)
CPU_SHAPE = {"NODES": "1", "TASKS_PER_NODE": "2", "GPUS_PER_NODE": "0"}
CPU_SBATCH = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]
TOTAL_STEPS = 12
SLOW_START_S = 900  # start-up took minutes on a loaded 2-core machine
VAL_SMALL = "val_small.arrow"


def demo_overrides(demo_root: Path) -> str:
    """A 2-rank fp32 CPU demo that takes well under a minute; checkpoints only on preemption."""
    return " ".join(
        [
            f"--data.demo_root={demo_root}",
            f"--data.val_index={demo_root / VAL_SMALL}",
            "--data.num_workers=0",
            "--train.precision=fp32",
            "--train.micro_batch_size=4",
            "--train.global_batch_size=8",
            "--optim.warmup_steps=2",
            f"--train.total_steps={TOTAL_STEPS}",
            "--logging.log_every_steps=1",
            "--logging.wandb=false",
            "--eval.final_report=false",
            "--logging.progress_bar=false",
            f"--checkpoint.every_steps={10 * TOTAL_STEPS}",
        ]
    )


def read_metrics(output_dir: Path) -> list[dict]:
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
    job_id = sbatch([*CPU_SBATCH, f"--output={root}/%x-%j.out", f"--error={root}/%x-%j.err", "slurm/eva_g.sh"], env)
    try:
        fields = wait_job_ended(job_id, timeout_s=SLOW_START_S)
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
    submit = subprocess.run(
        [
            "bash",
            "slurm/eva_g.sh",
            "--submit",
            "--cpus-per-task=1",
            "--time=15",
            f"--output={tmp_path}/%x-%j.out",
            f"--error={tmp_path}/%x-%j.err",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = re.search(r"submitted job (\d+)", submit.stdout).group(1)
    output_dir = tmp_path / f"eva-g-{job_id}"
    try:
        deadline = time.monotonic() + SLOW_START_S
        while len(read_metrics(output_dir)) < 3:  # mid-run: a few steps done, most to go
            assert time.monotonic() < deadline and job_fields(job_id).get("JobState") not in ENDED, job_log(
                tmp_path, job_id
            )[-3000:]
            time.sleep(0.2)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
        fields = wait_job_ended(job_id, timeout_s=SLOW_START_S)
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
@pytest.mark.parametrize(
    "env_update, message",
    [
        ({"EXTRA_ARGS": "--train.global_batch_size=3 --train.micro_batch_size=1"}, "not a multiple"),
        ({"DATA_INDEX": "/nonexistent/train.arrow"}, "does not exist"),
    ],
)
def test_dry_run_rejects_broken_config_without_queueing(cluster, tmp_path, env_update, message):
    before = set(queued_job_ids())
    env = job_env(RECIPE="demo", OUTPUT_ROOT=str(tmp_path), **CPU_SHAPE, **env_update)
    done = subprocess.run(
        ["bash", "slurm/eva_g.sh", "--submit", "--time=15"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode != 0
    assert message in done.stderr + done.stdout
    assert "nothing was queued" in done.stderr
    assert "submitted job" not in done.stdout
    assert set(queued_job_ids()) <= before


# --- every way a job is told to stop (issue: signals and SLURM) --------------------------------

SIGNAL_BASE_SBATCH = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]
LONG_RUN = 2000  # steps: never reached, the signal (or the time limit) ends the run first


def submit_demo(
    root: Path,
    demo_root: Path,
    *,
    total_steps: int = LONG_RUN,
    extra_args: str = "",
    time_limit: str = "15",
    sbatch_extra=(),
) -> tuple:
    overrides = demo_overrides(demo_root).replace(
        f"--train.total_steps={TOTAL_STEPS}", f"--train.total_steps={total_steps}"
    )
    env = job_env(RECIPE="demo", OUTPUT_ROOT=str(root), EXTRA_ARGS=f"{overrides} {extra_args}")
    job_id = sbatch(
        [
            *SIGNAL_BASE_SBATCH,
            f"--time={time_limit}",
            *sbatch_extra,
            f"--output={root}/%x-%j.out",
            f"--error={root}/%x-%j.err",
            "slurm/eva_g.sh",
        ],
        env,
    )
    return job_id, root / f"eva-g-{job_id}"


def wait_for_steps(job_id: str, root: Path, output_dir: Path, steps: int) -> None:
    deadline = time.monotonic() + SLOW_START_S
    while len(read_metrics(output_dir)) < steps:
        assert time.monotonic() < deadline and job_fields(job_id).get("JobState") not in ENDED, job_log(root, job_id)[
            -3000:
        ]
        time.sleep(0.2)


def complete_checkpoint_step(output_dir: Path) -> int:
    tag = (output_dir / "checkpoints" / "latest").read_text().strip()
    record = json.loads((output_dir / "checkpoints" / tag / "COMPLETE").read_text())
    assert record["world_size"] == 2
    return record["step"]


def stays_down(job_id: str, seconds: float = 25) -> dict[str, str]:
    """A requeued job would be PENDING/RUNNING again within cred_expire (10 s here) + a scheduler pass."""
    time.sleep(seconds)
    return job_fields(job_id)


@needs_entry_point
@pytest.mark.slow
def test_scancel_term_to_the_tasks_saves_and_stops_without_requeue(cluster, demo_root, tmp_path):
    """`scancel --signal=TERM` reaches the tasks (and their DataLoader workers), not srun: the ranks
    save at one step and stop for good, exit 0; the workers do not die first."""
    job_id, output_dir = submit_demo(tmp_path, demo_root, extra_args="--data.num_workers=1")
    try:
        wait_for_steps(job_id, tmp_path, output_dir, 3)
        subprocess.run(["scancel", "--signal=TERM", job_id], check=True)
        fields = wait_job_ended(job_id, timeout_s=SLOW_START_S)
        fields = stays_down(job_id)
    finally:
        subprocess.run(["scancel", job_id])
    log = job_log(tmp_path, job_id)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "0", log[-3000:]
    assert fields["ExitCode"] == "0:0"
    step = complete_checkpoint_step(output_dir)
    assert 3 <= step < LONG_RUN and read_metrics(output_dir)[-1]["step"] == step
    assert "not requeueing" in log and "killed by signal" not in log, log[-3000:]


@needs_entry_point
@pytest.mark.slow
def test_scancel_during_start_up_cancels_for_good(cluster, demo_root, tmp_path):
    job_id, output_dir = submit_demo(tmp_path, demo_root)
    try:
        deadline = time.monotonic() + 120
        while "restart 0:" not in job_log(tmp_path, job_id):  # the batch shell runs, the ranks start up
            assert time.monotonic() < deadline, job_fields(job_id)
            time.sleep(0.2)
        subprocess.run(["scancel", job_id], check=True)
        wait_job_ended(job_id, timeout_s=120)
        fields = stays_down(job_id)
    finally:
        subprocess.run(["scancel", job_id])
    assert fields["JobState"] == "CANCELLED" and fields["Restarts"] == "0", job_log(tmp_path, job_id)[-3000:]
    assert not (output_dir / "checkpoints" / "latest").exists()


@needs_entry_point
@pytest.mark.slow
def test_scancel_full_term_is_explained_and_not_requeued(cluster, demo_root, tmp_path):
    """--full also signals srun, which SIGKILLs its tasks (SLURM's behaviour): nothing can be saved
    after the last periodic checkpoint. It must stay intact, the job must not come back, and the
    log must say why and how to resume."""
    job_id, output_dir = submit_demo(tmp_path, demo_root, extra_args="--checkpoint.every_steps=2")
    try:
        wait_for_steps(job_id, tmp_path, output_dir, 5)
        subprocess.run(["scancel", "--signal=TERM", "--full", job_id], check=True)
        wait_job_ended(job_id, timeout_s=SLOW_START_S)
        fields = stays_down(job_id)
    finally:
        subprocess.run(["scancel", job_id])
    log = job_log(tmp_path, job_id)
    assert fields["JobState"] in ENDED and fields["Restarts"] == "0", log[-3000:]
    assert complete_checkpoint_step(output_dir) >= 2
    assert f"Resume with: OUTPUT_DIR={output_dir}" in log and "sbatch --nodes=1 --ntasks-per-node=2" in log, log[-3000:]
    assert str(REPO / "slurm/eva_g.sh") in log


@needs_entry_point
@pytest.mark.slow
def test_time_limit_without_warning_says_so_and_names_the_resume_command(cluster, demo_root, tmp_path):
    """SLURM's TERM at the time limit: the shell says at once what happened and how to resume (SIGKILL
    follows after KillWait, for the shell too). Ranks that manage to save in time requeue the job
    (a time limit is a reason to come back); ranks killed first leave it TIMEOUT."""
    # B:URG (ignored by bash) replaces the template's B:USR1 warning: the time limit comes unannounced.
    job_id, output_dir = submit_demo(tmp_path, demo_root, time_limit="1", sbatch_extra=["--signal=B:URG@1"])
    try:
        deadline = time.monotonic() + SLOW_START_S
        while True:
            fields = job_fields(job_id)
            if fields.get("JobState") in ENDED or fields.get("Restarts", "0") != "0":
                break
            assert time.monotonic() < deadline, job_log(tmp_path, job_id)[-3000:]
            time.sleep(0.5)
    finally:
        subprocess.run(["scancel", job_id])
    log = job_log(tmp_path, job_id)
    assert "the job reached its time limit" in log and f"Resume with: OUTPUT_DIR={output_dir}" in log, log[-3000:]
    if fields.get("Restarts", "0") == "0":
        assert fields["JobState"] == "TIMEOUT", log[-3000:]
    else:  # requeued by rank 0: only after a complete save
        assert complete_checkpoint_step(output_dir) >= 1 and "requeueing SLURM job" in log, log[-3000:]


@needs_entry_point
@pytest.mark.slow
def test_usr1_after_the_run_finished_does_not_requeue(cluster, demo_root, tmp_path):
    job_id, output_dir = submit_demo(tmp_path, demo_root, total_steps=TOTAL_STEPS)
    try:
        deadline = time.monotonic() + SLOW_START_S
        while "run finished at step" not in job_log(tmp_path, job_id):
            assert time.monotonic() < deadline and job_fields(job_id).get("JobState") not in ENDED, job_log(
                tmp_path, job_id
            )[-3000:]
            time.sleep(0.1)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id])  # may find the job gone: fine
        wait_job_ended(job_id, timeout_s=SLOW_START_S)
        fields = stays_down(job_id)
    finally:
        subprocess.run(["scancel", job_id])
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "0", job_log(tmp_path, job_id)[-3000:]
    assert read_metrics(output_dir)[-1]["step"] == TOTAL_STEPS


def dry_run(env_update: dict[str, str], *sbatch_flags: str):
    env = job_env(RECIPE="demo", **CPU_SHAPE, **env_update)
    return subprocess.run(
        ["bash", "slurm/eva_g.sh", "--dry-run", *sbatch_flags],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )


@needs_entry_point
def test_dry_run_reads_teacher_and_refuses_a_file_that_is_not_weights(tmp_path):
    teacher = tmp_path / "teacher.pt"
    teacher.write_text("not a state dict")
    done = dry_run(
        {"TEACHER": str(teacher), "EXTRA_ARGS": "--teacher.random_init=false --teacher.input_transform=none"}
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert str(teacher) in done.stderr and "nothing was queued" in done.stderr
    assert f"--teacher.checkpoint={teacher}" in done.stdout  # TEACHER reached pretrain.py


@needs_entry_point
def test_dry_run_submit_line_keeps_every_setting_given(tmp_path):
    import shlex

    given = {
        "OUTPUT_ROOT": str(tmp_path / "runs here"),
        "EXTRA_ARGS": "--train.total_steps=5 --logging.wandb=false",
        "RESUME": "none",
        "STEP_SIGNAL": "USR1",
    }
    done = dry_run(given, "--time=15")
    assert done.returncode == 0, done.stdout + done.stderr
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("submit with: ")]
    words = shlex.split(line.removeprefix("submit with: "))
    assignments = dict(w.split("=", 1) for w in words[: words.index("sbatch")])
    assert {k: assignments.get(k) for k in given} == given
    assert assignments["RECIPE"] == "demo" and words[-1].endswith("slurm/eva_g.sh") and "--time=15" in words
