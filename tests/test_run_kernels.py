"""The run record names the kernels each shape class runs and why: pretrain.py with EVA_KERNELS=triton on CPU
(Triton's interpreter) self-checks our kernels at the run's own shapes before the first step and stores the
verdicts in OUT/config.json under run.kernels.selfcheck. (On a GPU `auto` does the same; tests/test_kernels_selfcheck.py
covers wrong and slow kernels through the test hook.)"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_forced_triton_run_records_a_passed_check_per_shape_class(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline", TRITON_INTERPRET="1", EVA_KERNELS="triton")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    args = [
        sys.executable,
        "eva_train/pretrain.py",
        "--output_dir",
        str(out),
        f"--data.demo_root={tmp_path / 'demo'}",
        "--model.variant=eva_debug_p4",
        "--model.img_size=16",
        "--train.micro_batch_size=2",
        "--train.global_batch_size=2",
        "--train.total_steps=1",
        "--data.num_workers=0",
        "--data.val_index=",
        "--logging.wandb=false",
        "--logging.progress_bar=false",
        "--eval.final_report=false",
        "--eval.knn_every_steps=0",
        "--deepspeed_config",
        "ds_configs/zero1.json",
    ]
    # config.json is written (atomically) once the run is built, before the first step: the check is done by then,
    # and the steps that would follow under the interpreter cost minutes, so the run is stopped there.
    log = open(tmp_path / "run.log", "w")  # a file, not a pipe: a full pipe would block the run
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    config = out / "config.json"
    try:
        deadline = time.time() + 900
        while not config.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert config.exists(), (tmp_path / "run.log").read_text()[-3000:]
    finally:
        proc.kill()
        proc.wait()
        log.close()
    kernels = json.loads((out / "config.json").read_text())["run"]["kernels"]
    assert kernels["backend"] == "triton"
    checked = kernels["selfcheck"]
    assert {key.split("/")[0] for key in checked} >= {"layer_norm", "add_layer_norm", "attention"}, checked
    for key, decision in checked.items():
        assert decision["status"] == "passed" and decision["use"] == "triton", (key, decision)
        assert decision["reason"], key
