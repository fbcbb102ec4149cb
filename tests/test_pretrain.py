"""The real entry point on CPU: `deepspeed --num_gpus 2 eva_train/pretrain.py` (ZeRO-3 demo), a one-process
ZeRO-1 run, a 2-rank run reading tar shards through an Arrow index, and the CLI's dry run / errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.procs import free_port, launch_pretrain, wait_all

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "eva_train" / "pretrain.py"
DEEPSPEED = Path(sys.executable).with_name("deepspeed")
RUN_TIMEOUT_S = 900


def quick(*extra: str):
    return [
        "--data.num_workers=0",
        "--logging.wandb=false",
        "--logging.progress_bar=false",
        "--eval.final_report=false",
        *extra,
    ]


def run_cli(args, env_extra=None, timeout=RUN_TIMEOUT_S):
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline", **(env_extra or {}))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None) if not env_extra or name not in env_extra else None
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def metrics(out: Path):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def launch_ranks(out: Path, world_size: int, args):
    """One plain process per rank with the launcher's environment (as torchrun / srun would set it); their logs."""
    procs = launch_pretrain(out, world_size, args)
    codes = wait_all(procs, RUN_TIMEOUT_S)
    logs = [(out / f"log_rank{r}.txt").read_text() for r in range(world_size)]
    assert codes == [0] * world_size, logs[0][-4000:] + logs[-1][-4000:]
    return logs


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return tmp_path_factory.mktemp("engine_demo_data")


def assert_checkpoint(out: Path, step: int, world_size: int):
    tag = f"step_{step:08d}"
    assert (out / "checkpoints" / "latest").read_text().strip() == tag
    record = json.loads((out / "checkpoints" / tag / "COMPLETE").read_text())
    assert record["step"] == step and record["world_size"] == world_size


@pytest.mark.slow
def test_deepspeed_launcher_two_rank_zero3_demo_loss_falls_and_checkpoints(demo_root, tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        [
            str(DEEPSPEED),
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            str(PRETRAIN),
            "--deepspeed_config",
            "ds_configs/zero3.json",
            "--output_dir",
            str(out),
            *quick(
                f"--data.demo_root={demo_root}",
                "--train.total_steps=24",
                "--logging.log_every_steps=2",
                "--train.val_every_steps=12",
                "--checkpoint.every_steps=12",
            ),
        ]
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(2, 25, 2))
    for key in ("loss", "lr", "grad_norm", "images_per_sec", "mfu", "data_wait_frac", "epoch", "bad_samples"):
        assert key in rows[0], key
    assert rows[0]["mfu"] is None and rows[0]["images_per_sec"] > 0 and 0 <= rows[0]["data_wait_frac"] <= 1
    late_loss = sum(r["loss"] for r in rows[-3:]) / 3  # step losses are noisy: average
    assert late_loss < rows[0]["loss"] - 0.1, [r["loss"] for r in rows]
    assert "val_loss" in rows[5] and "val_loss" in rows[-1]
    assert_checkpoint(out, 24, world_size=2)
    assert (out / "checkpoints" / "step_00000012" / "COMPLETE").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["run"]["world_size"] == 2 and config["run"]["deepspeed"]["zero_optimization"]["stage"] == 3
    assert config["train"]["global_batch_size"] == 64 and config["run"]["gradient_accumulation_steps"] == 1


@pytest.mark.slow
def test_single_process_zero1_run_then_resume_appends(demo_root, tmp_path):
    out = tmp_path / "run"
    base = [
        sys.executable,
        str(PRETRAIN),
        "--deepspeed_config",
        "ds_configs/zero1.json",
        "--output_dir",
        str(out),
        *quick(
            f"--data.demo_root={demo_root}",
            "--train.total_steps=4",
            "--logging.log_every_steps=1",
            "--train.max_steps_this_run=2",
            "--data.val_index=",
        ),
    ]
    first = run_cli(base)
    assert first.returncode == 0, first.stderr[-3000:]
    assert [r["step"] for r in metrics(out)] == [1, 2] and metrics(out)[0]["lr"] > 0
    assert_checkpoint(out, 2, world_size=1)
    second = run_cli(base)  # --resume auto is the default
    assert second.returncode == 0, second.stderr[-3000:]
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    assert json.loads((out / "config.json").read_text())["run"]["deepspeed"]["zero_optimization"]["stage"] == 1


@pytest.mark.slow
def test_bad_sample_count_continues_across_resume(tmp_path):
    """A third of the files are broken: the cumulative bad_samples of a run stopped after step 2 and
    resumed equals the uninterrupted run's, step for step (the count travels in the checkpoint)."""
    import numpy as np
    from PIL import Image

    from eva_train.data.build import build_index

    folder = tmp_path / "images" / "class0"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(48):
        path = folder / f"{i:03d}.jpg"
        if i % 3:
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        else:
            path.write_bytes(b"" if i % 2 else b"not an image")
    index = build_index([str(tmp_path / "images")], str(tmp_path / "train.arrow"), num_workers=1)

    def cli(out, *extra):
        return [
            sys.executable,
            str(PRETRAIN),
            "--deepspeed_config",
            "ds_configs/zero1.json",
            "--output_dir",
            str(out),
            *quick(
                "--data.demo_root=",
                f"--data.index={index}",
                "--data.val_index=",
                "--train.total_steps=4",
                "--train.global_batch_size=8",
                "--train.micro_batch_size=8",
                "--logging.log_every_steps=1",
                "--data.bad_sample_threshold=0.9",
                *extra,
            ),
        ]

    for args in (
        cli(tmp_path / "whole"),
        cli(tmp_path / "split", "--train.max_steps_this_run=2"),
        cli(tmp_path / "split"),
    ):
        result = run_cli(args)
        assert result.returncode == 0, result.stderr[-3000:]
    whole, split = metrics(tmp_path / "whole"), metrics(tmp_path / "split")
    assert [r["step"] for r in split] == [1, 2, 3, 4]
    assert [r["bad_samples"] for r in split] == [r["bad_samples"] for r in whole]
    assert 0 < whole[1]["bad_samples"] < whole[-1]["bad_samples"] < 32


@pytest.mark.slow
def test_two_ranks_read_tar_shards_through_the_index(tmp_path):
    from eva_train.data.build import build_index
    from tests.helpers.data import write_tar_shards

    write_tar_shards(tmp_path / "shards", num_samples=48, num_shards=3, img_size=64)
    index = build_index([str(tmp_path / "shards")], str(tmp_path / "train.arrow"), num_workers=1)
    out = tmp_path / "run"
    launch_ranks(
        out,
        2,
        [
            "--deepspeed_config",
            "ds_configs/zero2.json",
            "--data.demo_root=",
            f"--data.index={index}",
            *quick(
                "--train.global_batch_size=16",
                "--train.micro_batch_size=4",
                "--train.total_steps=3",
                "--logging.log_every_steps=1",
            ),
        ],
    )
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["bad_samples"] == 0
    assert rows[-1]["epoch"] == pytest.approx(3 * 16 / 48)
    assert json.loads((out / "config.json").read_text())["run"]["gradient_accumulation_steps"] == 2
    assert_checkpoint(out, 3, world_size=2)


@pytest.mark.slow
def test_two_rank_zero3_run_starts_from_init_from_weights(demo_root, tmp_path):
    """model.init_from under ZeRO-3 (each param gathered, filled on rank 0, re-partitioned): with lr 1e-30
    (lr must be > 0) the checkpoint after one step holds the file's weights (given here in timm names) to
    within 1e-20, far below any difference a wrongly imported tensor would show."""
    import torch
    from safetensors.torch import load_file, save_file

    from eva_train.export.consolidate import consolidate
    from eva_train.export.layouts import to_layout
    from eva_train.models import build_backbone

    torch.manual_seed(1234)  # not the run's seed: the run's own init would not match
    weights = {k: v.contiguous() for k, v in build_backbone("eva_demo_p8", 64).state_dict().items()}
    save_file(to_layout(weights, "timm"), str(tmp_path / "init.safetensors"))
    out = tmp_path / "run"
    logs = launch_ranks(
        out,
        2,
        [
            "--deepspeed_config",
            "ds_configs/zero3.json",
            f"--data.demo_root={demo_root}",
            f"--model.init_from={tmp_path / 'init.safetensors'}",
            "--optim.lr=1e-30",
            "--optim.min_lr=0",
            *quick("--train.total_steps=1", "--data.val_index="),
        ],
    )
    assert "model.init_from" in logs[0] and "3 missing (mask_token, lm_head.weight, lm_head.bias)" in logs[0], logs[0][
        -3000:
    ]
    trained = load_file(consolidate(str(out), str(tmp_path / "after.safetensors"), progress=False).path)
    assert set(weights) < set(trained)
    for name, value in weights.items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=1e-20, msg=name)


@pytest.fixture
def lone_rank_env(monkeypatch):
    """main() in this process, as rank 0 of 2 (restored afterwards: it fills the rank variables in)."""
    for name, value in {
        "WORLD_SIZE": "2",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "x",
        "MASTER_PORT": "1",
    }.items():
        monkeypatch.setenv(name, value)


def test_print_config_and_dry_run_plan(tmp_path, lone_rank_env, capsys):
    from eva_train.pretrain import main

    assert main(["--print-config", "--optim.lr=7e-4", "--output_dir", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["optim"]["lr"] == 7e-4
    assert main(["--dry-run", "--output_dir", str(tmp_path / "o"), "--local_rank=0"]) == 0
    plan = capsys.readouterr().out
    assert '"gradient_accumulation_steps": 1' in plan and '"world_size": 2' in plan
    assert not (tmp_path / "o").exists()  # a dry run creates nothing


def test_dry_run_as_a_script_in_a_fresh_process(tmp_path):
    result = run_cli(
        [
            sys.executable,
            str(PRETRAIN),
            "--dry-run",
            "--recipe",
            "eva_g_p14_m30m",
            "--data.index=/no/index.arrow",
            "--teacher.checkpoint=/no/clip.pt",
        ],
        timeout=300,
    )
    assert result.returncode == 2 and result.stderr.startswith("error: teacher.checkpoint '/no/clip.pt'"), result.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model.variant=eva_huge"], "model.variant 'eva_huge' is unknown"),
        (["--model.img_size=63"], "not divisible by the patch size"),
        (["--train.micro_batch_size=48"], "not a multiple of"),
        (["--data.demo_root=", "--data.index=/no/such/index.arrow"], "does not exist; build it"),
        (
            ["--teacher.random_init=false", "--teacher.checkpoint=/no/clip.pt"],
            "teacher.checkpoint '/no/clip.pt' does not exist",
        ),
        (["--teacher.name=ViT-Nope"], "teacher.name 'ViT-Nope'"),
        (["--deepspeed_config=/no/ds.json"], "deepspeed config '/no/ds.json' not found"),
        (["--output_dir=FILE/run"], "not a folder"),
        (["--resume=/no/ckpt"], "checkpoint.resume '/no/ckpt' does not exist"),
        (["--model.init_from=/no/eva.pt"], "model.init_from '/no/eva.pt' does not exist"),
        (["--bogus"], "unrecognised argument"),
        (["--resume"], "argument --resume: expected one argument; see --help"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, lone_rank_env, capsys, args, message):
    from eva_train.pretrain import main

    (tmp_path / "FILE").write_text("")
    args = [a.replace("FILE", str(tmp_path / "FILE")) for a in args]
    assert main(["--dry-run", *args]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], lines
