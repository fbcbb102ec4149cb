"""The one validation gate: bad values, a bad `--resume` target, an `init_from` file that does not fit
and a teacher file that is not the tower's weights all fail in the dry run AND at the real start,
before any model is built, as one line on stderr with exit code 2, said once (rank 0) however many
ranks there are. Weights files are real: our model's own state dict (edited) and open_clip's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eva_train.pretrain import main

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "eva_train" / "pretrain.py"
CLIP_TEACHER = ["--teacher.random_init=false", "--teacher.input_transform=none", "--teacher.name=ViT-S-32"]


@pytest.fixture
def rank0(monkeypatch):
    for name, value in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def clip_s32(tmp_path_factory) -> Path:
    """A whole open_clip CLIP (text side too), as a user would save it: torch.save(model.state_dict())."""
    import open_clip

    path = tmp_path_factory.mktemp("clip") / "vit_s32.pt"
    torch.save(open_clip.create_model("ViT-S-32", pretrained=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def demo_weights(tmp_path_factory) -> Path:
    """eva_demo_p8's backbone weights (what model.init_from accepts), as safetensors."""
    from safetensors.torch import save_file

    from eva_train.models import build_backbone

    path = tmp_path_factory.mktemp("init") / "demo.safetensors"
    save_file({k: v.contiguous() for k, v in build_backbone("eva_demo_p8", 64).state_dict().items()}, str(path))
    return path


def dry_run(capsys, *args):
    code = main(["--dry-run", *args])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, lines


def assert_one_line_error(code, lines, *needles):
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, lines)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_resume_from_a_garbage_file_or_an_empty_dir(tmp_path, rank0, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    empty = tmp_path / "empty"
    empty.mkdir()
    for target in (garbage, empty):
        assert_one_line_error(
            *dry_run(capsys, f"--output_dir={tmp_path / 'out'}", f"--resume={target}"),
            str(target),
            "no complete checkpoint",
        )


def test_resume_from_a_checkpoint_with_a_rank_file_missing(tmp_path, rank0, capsys):
    tag = tmp_path / "checkpoints" / "step_00000004"
    tag.mkdir(parents=True)
    (tag / "COMPLETE").write_text(json.dumps({"step": 4, "world_size": 2, "zero_stage": 3}))
    for name in (
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ):
        torch.save({"x": torch.zeros(1)}, tag / name)
    assert_one_line_error(
        *dry_run(capsys, f"--output_dir={tmp_path / 'out'}", f"--resume={tmp_path}"),
        "is incomplete",
        "zero_pp_rank_1_mp_rank_00_model_states.pt",
    )


def test_init_from_a_fitting_file_passes_and_unfit_ones_are_named(tmp_path, rank0, capsys, demo_weights):
    from safetensors.torch import load_file, save_file

    out = f"--output_dir={tmp_path / 'out'}"
    assert dry_run(capsys, out, f"--model.init_from={demo_weights}") == (0, [])
    weights = load_file(str(demo_weights))
    weights.pop("blocks.1.norm2.weight")  # missing
    weights["blocks.0.attn.proj.weight"] = torch.zeros(7, 7)  # mis-shaped
    weights["blocks.0.attn.norm.weight"] = torch.zeros(128)  # unexpected (an EVA02-CLIP attn.norm)
    save_file(weights, str(tmp_path / "unfit.safetensors"))
    assert_one_line_error(
        *dry_run(capsys, out, f"--model.init_from={tmp_path / 'unfit.safetensors'}"),
        "does not fit",
        "blocks.1.norm2.weight",
        "blocks.0.attn.proj.weight",
        "blocks.0.attn.norm.weight",
    )
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    assert_one_line_error(
        *dry_run(capsys, out, f"--model.init_from={text}"),
        f"model.init_from: {text} could not be read as plain tensors",
    )


def test_teacher_file_must_be_the_towers_weights(tmp_path, rank0, capsys, clip_s32):
    out = f"--output_dir={tmp_path / 'out'}"
    assert dry_run(capsys, out, *CLIP_TEACHER, f"--teacher.checkpoint={clip_s32}") == (0, [])
    text = tmp_path / "clip.pt"
    text.write_text("not a checkpoint\n")
    assert_one_line_error(
        *dry_run(capsys, out, *CLIP_TEACHER, f"--teacher.checkpoint={text}"),
        f"teacher.checkpoint: {text} could not be read as plain tensors",
    )
    other_tower = [a.replace("ViT-S-32", "ViT-S-16") for a in CLIP_TEACHER]  # same keys, other patch size
    assert_one_line_error(
        *dry_run(capsys, out, *other_tower, f"--teacher.checkpoint={clip_s32}"), "does not fit", "conv1.weight"
    )


def test_real_start_fails_before_the_model_is_built_and_only_rank_0_says_so(tmp_path):
    """Two ranks started as srun/torchrun would, no dry run: the bad value is caught before any log
    line (building a model, the process group or the teacher logs), one line in total, exit 2."""
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        WANDB_MODE="offline",
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29999",
    )
    for bad in ("--optim.lr=-1",):
        procs = [
            subprocess.Popen(
                [sys.executable, str(PRETRAIN), f"--output_dir={tmp_path / 'out'}", bad],
                cwd=REPO,
                env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for r in range(2)
        ]
        results = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [2, 2], results
        lines = [line for _, err in results for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: optim.lr=-1.0 is out of range"), lines
        assert not (tmp_path / "out").exists()
