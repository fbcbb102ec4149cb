"""Config parsing (recipe <- overrides), recipes, and the one-line errors of validate / the DeepSpeed JSON."""

import json
import os
import subprocess

import pytest

from eva_train.config import ConfigError, available_recipes, build_config, derived_grad_accum, validate
from eva_train.train.engine import build_ds_config

RECIPES = ("demo", "eva_g_p14_m30m", "eva02_l_p14", "eva_mae_b16")


def demo(*overrides, tmp_path=None):
    out = [f"--train.output_dir={tmp_path}"] if tmp_path else []
    return build_config("demo", [*out, *overrides])


def test_all_recipes_exist_and_parse():
    assert set(RECIPES) <= set(available_recipes())
    for name in RECIPES:
        assert build_config(name).recipe == name


def test_eva_g_recipe_is_the_eva01_recipe():
    cfg = build_config("eva_g_p14_m30m")
    assert (cfg.model.variant, cfg.model.img_size, cfg.model.drop_path_rate) == ("eva_g_p14", 224, 0.1)
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay, cfg.optim.grad_clip) == (
        1e-3,
        (0.9, 0.98),
        1e-6,
        0.05,
        3.0,
    )
    assert (cfg.train.global_batch_size, cfg.train.epochs, cfg.mask.num_masking_patches) == (4096, 150.0, 105)


def test_mae_recipe_differs_where_mae_differs():
    cfg = build_config("eva_mae_b16")
    assert (cfg.model.mode, cfg.model.variant, cfg.mask.strategy, cfg.optim.betas) == (
        "mae",
        "eva_mae_b16",
        "random",
        (0.9, 0.95),
    )


def test_overrides_are_typed_and_win_over_the_recipe():
    cfg = demo(
        "--optim.lr=2e-4",
        "--train.total_steps",
        "7",
        "--optim.betas=0.8,0.9",
        "--logging.wandb=false",
        "--data.index=a.arrow,b.arrow",
    )
    assert cfg.optim.lr == 2e-4 and cfg.train.total_steps == 7 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.logging.wandb is False and cfg.data.index == ["a.arrow", "b.arrow"]


@pytest.mark.parametrize(
    "override,message",
    [
        ("--model.nope=1", "unknown key 'model.nope'"),
        ("--nosection.x=1", "unknown section 'nosection'"),
        ("--train.total_steps=2.5", "expected int"),
        ("--logging.wandb=maybe", "expected true/false"),
        ("positional", "unrecognised argument"),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message):
        demo(override)


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ConfigError, match="not found; use one of .*demo"):
        build_config("no_such_recipe")


def test_demo_validates(tmp_path):
    validate(demo(tmp_path=tmp_path), world_size=2)


@pytest.mark.parametrize(
    "override,world_size,message",
    [
        ("--model.variant=eva_zz", 1, "model.variant 'eva_zz' is unknown"),
        ("--model.img_size=60", 1, "not divisible by the patch size 8"),
        ("--train.micro_batch_size=24", 2, "not a multiple of"),
        ("--train.precision=fp8", 1, "train.precision 'fp8' is unknown; use one of bf16, fp16, fp32"),
        ("--mask.strategy=typo", 1, "mask.strategy 'typo' is unknown; use one of block, random"),
        ("--optim.lr=-1", 1, r"optim.lr=-1.0 is out of range: it must be > 0"),
        ("--optim.lr=0", 1, r"optim.lr=0.0 is out of range"),
        ("--optim.lr=nan", 1, r"optim.lr=nan is out of range"),
        ("--optim.warmup_steps=-1", 1, r"optim.warmup_steps=-1 is out of range: it must be >= 0"),
        ("--optim.betas=0.9,1.0", 1, r"optim.betas=\(0.9, 1.0\) is out of range: it must be \[0, 1\)"),
        ("--train.micro_batch_size=0", 1, r"train.micro_batch_size=0 is out of range: it must be > 0"),
        ("--train.global_batch_size=-64", 1, r"train.global_batch_size=-64 is out of range"),
        ("--train.epochs=-1", 1, r"train.epochs=-1.0 is out of range"),
        ("--mask.num_masking_patches=256", 1, r"mask.num_masking_patches=256 must lie in \(0, 256\)"),
        ("--optim.min_lr=1", 1, "optim.min_lr=1.0 is above optim.lr"),
        ("--teacher.random_init=false", 1, "teacher.checkpoint is empty"),
        ("--data.demo_root=", 1, "data.index is empty"),
        ("--data.index=/nonexistent/train.arrow", 1, "does not exist; build it"),
    ],
)
def test_validate_errors_are_one_line_with_a_fix(tmp_path, override, world_size, message):
    with pytest.raises(ConfigError, match=message) as info:
        validate(demo(override, tmp_path=tmp_path), world_size)
    assert "\n" not in str(info.value)


def literal_fields():
    """(section.key, choices) of every Literal[...] field of the pretraining config."""
    from typing import Literal, get_args, get_origin, get_type_hints

    cfg = demo()
    return [
        (f"{section}.{key}", get_args(hint))
        for section in cfg.to_dict()
        if section != "recipe"
        for key, hint in get_type_hints(type(getattr(cfg, section))).items()
        if get_origin(hint) is Literal
    ]


def test_enumerated_fields_are_declared_literal():
    names = {name for name, _ in literal_fields()}
    assert {
        "mask.strategy",
        "model.mode",
        "model.kernels",
        "train.precision",
        "teacher.precision",
        "teacher.input_transform",
    } <= names


@pytest.mark.parametrize("name,choices", literal_fields())
def test_every_literal_field_refuses_an_unknown_value_from_the_command_line_and_from_code(name, choices):
    with pytest.raises(ConfigError, match=f"{name} 'typo' is unknown; use one of") as info:
        demo(f"--{name}=typo")
    assert all(str(c) in str(info.value) for c in choices)
    assert demo(f"--{name}={choices[-1]}") is not None  # every declared choice is accepted
    cfg = demo()
    section, key = name.split(".")
    setattr(getattr(cfg, section), key, "typo")  # set in code: validate checks it too
    with pytest.raises(ConfigError, match=f"{name} 'typo' is unknown"):
        validate(cfg)


def test_missing_teacher_file(tmp_path):
    cfg = demo("--teacher.random_init=false", f"--teacher.checkpoint={tmp_path}/clip.pt", tmp_path=tmp_path)
    with pytest.raises(ConfigError, match="does not exist; download"):
        validate(cfg)


def test_output_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("a file where a folder should be")
    with pytest.raises(ConfigError, match="which is not a folder"):
        validate(demo(f"--train.output_dir={tmp_path}/taken/run"))


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody may write, root included (CI runs as root, which chmod does not stop): a read-only bind
    mount of it, or, where mounting is not allowed, chmod 500 for a non-root user."""
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() != 0:
        locked.chmod(0o500)
        yield locked
        locked.chmod(0o700)
        return
    bind = subprocess.run(["mount", "--bind", str(locked), str(locked)], capture_output=True, text=True)
    if bind.returncode != 0:
        pytest.skip(f"root without mount rights here: {bind.stderr.strip()}")
    try:
        remount = subprocess.run(["mount", "-o", "remount,ro,bind", str(locked)], capture_output=True, text=True)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only: {remount.stderr.strip()}")
        yield locked
    finally:
        subprocess.run(["umount", str(locked)], check=True)


def test_unwritable_output_dir_is_refused(read_only_dir):
    assert not os.access(read_only_dir, os.W_OK)  # the fixture really denies writing, also to root
    with pytest.raises(ConfigError, match="not writable"):
        validate(demo(f"--train.output_dir={read_only_dir}/run"))


def test_grad_accumulation_is_derived_from_the_recipe():
    cfg = demo()
    assert derived_grad_accum(cfg, 1) == 2 and derived_grad_accum(cfg, 2) == 1


def test_ds_config_is_completed_from_the_recipe():
    cfg = demo()
    ds = build_ds_config(cfg, world_size=2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        64,
        32,
        1,
    )
    assert ds["gradient_clipping"] == 3.0 and ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    ds = build_ds_config(demo("--train.precision=fp16", "--train.deepspeed_config=ds_configs/zero1.json"), 1)
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and ds["zero_optimization"]["stage"] == 1


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"train_batch_size": 128}, "train_batch_size=128 but the recipe implies 64"),
        ({"gradient_clipping": 1.0}, "gradient_clipping"),
        ({"bf16": {"enabled": True}}, r"\[bf16\] sets enabled=True"),
        ({"optimizer": {"type": "AdamW"}}, "has an 'optimizer' block"),
        ({"zero_optimization": {"stage": 4}}, "stage=4"),
    ],
)
def test_contradicting_ds_config_is_a_clear_error(tmp_path, extra, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **extra}))
    with pytest.raises(ConfigError, match=message):
        build_ds_config(demo(f"--train.deepspeed_config={path}"), world_size=2)


def test_agreeing_and_auto_ds_values_are_accepted(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps(
            {"train_batch_size": 64, "train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}
        )
    )
    assert build_ds_config(demo(f"--train.deepspeed_config={path}"), 2)["train_micro_batch_size_per_gpu"] == 32


def test_missing_ds_config_names_the_shipped_ones():
    with pytest.raises(ConfigError, match="zero3_offload.json"):
        build_ds_config(demo("--train.deepspeed_config=nope.json"), 1)
