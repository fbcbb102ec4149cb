"""Errors met while a real run is under way are one line too: the bad-sample abort (exit 2, said
once by rank 0 of two ranks, no traceback) and a full disk during a checkpoint save (exit 1,
"No space left on device" and the checkpoint path; the disk is a real 3 MiB tmpfs)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.procs import PRETRAIN, launch_pretrain, launch_ranks, rank_logs, wait_all

QUICK = [
    "--deepspeed_config",
    "ds_configs/zero1.json",
    "--data.num_workers=0",
    "--logging.wandb=false",
    "--logging.progress_bar=false",
    "--eval.final_report=false",
    "--data.val_index=",
    "--train.global_batch_size=8",
    "--train.micro_batch_size=4",
    "--logging.log_every_steps=1",
]


def error_lines(out: Path):
    return [line for line in rank_logs(out, tail_chars=10**6).splitlines() if line.startswith("error:")]


def small_index(tmp_path: Path, broken_every: int = 0) -> str:
    """32 random 64 px JPEGs in one class folder (every `broken_every`-th one not an image), indexed."""
    from eva_train.data.build import build_index

    folder = tmp_path / "images" / "class0"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(32):
        if broken_every and i % broken_every == 0:
            (folder / f"{i:03d}.jpg").write_bytes(b"not an image")
        else:
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i:03d}.jpg")
    return build_index([str(tmp_path / "images")], str(tmp_path / "train.arrow"), num_workers=1)


@pytest.mark.slow
def test_bad_sample_abort_is_one_line_from_rank_0_exit_2(tmp_path):
    index = small_index(tmp_path, broken_every=2)
    out = tmp_path / "run"
    procs = launch_pretrain(
        out,
        2,
        [
            *QUICK,
            "--data.demo_root=",
            f"--data.index={index}",
            "--train.total_steps=4",
            "--data.bad_sample_threshold=0.1",
            "--data.bad_sample_min_count=1",
        ],
    )
    assert wait_all(procs) == [2, 2], rank_logs(out)
    logs = rank_logs(out, tail_chars=10**6)
    assert "Traceback" not in logs, logs[-3000:]
    lines = error_lines(out)
    assert len(lines) == 1 and "data.bad_sample_threshold" in lines[0] and "failed to read or decode" in lines[0], lines


@pytest.fixture
def small_disk(tmp_path):
    """A real 3 MiB filesystem (tmpfs): room for config.json and metrics, not for a checkpoint."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


@pytest.mark.slow
def test_full_disk_during_a_save_names_no_space_and_the_path(tmp_path, small_disk):
    out, logs_dir = small_disk / "run", tmp_path / "logs"  # the rank's log stays off the full disk
    procs = launch_ranks(
        logs_dir,
        1,
        [
            sys.executable,
            PRETRAIN,
            "--output_dir",
            out,
            *QUICK,
            "--train.total_steps=1",
            "--data.demo_root=",
            f"--data.index={small_index(tmp_path)}",
        ],
    )
    assert wait_all(procs) == [1], rank_logs(logs_dir)
    logs = rank_logs(logs_dir, tail_chars=10**6)
    assert "Traceback" not in logs and "enforce fail" not in logs, logs[-3000:]
    lines = error_lines(logs_dir)
    assert len(lines) == 1, lines
    assert "No space left on device" in lines[0] and str(out / "checkpoints" / "step_00000001") in lines[0], lines
