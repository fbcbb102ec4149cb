"""The files a run is given, checked before any process group or model exists: the `--resume`
target is a complete checkpoint, `model.init_from` fits the variant, the teacher file fits its
tower. Weights files are read for their keys and shapes only (models.weights_file, meta=True) and
the models are built on the meta device, so checking EVA-g against a 4 GB file takes about a second
and no memory. Every problem is one ConfigError line (a ValueError of the teacher config lookup
becomes one in pretrain.start)."""

from pathlib import Path

import torch

from eva_train.config import Config, ConfigError
from eva_train.export.weights import check_init_from
from eva_train.models import build_model
from eva_train.models.teacher import check_teacher_weights, teacher_out_dim
from eva_train.models.weights_file import read_state_dict
from eva_train.runtime.checkpoint import CheckpointError, read_complete, resolve_checkpoint_path


def check_run_inputs(cfg: Config) -> None:
    check_resume_target(cfg.checkpoint.resume)
    teacher_dim = check_teacher_file(cfg)
    check_init_from_file(cfg, teacher_dim)


def read_shapes(path: str, what: str) -> dict[str, torch.Tensor]:
    """The file's tensors as meta tensors (names, shapes, dtypes; no data read), unwrapped."""
    try:
        return read_state_dict(path, meta=True)
    except ValueError as error:
        raise ConfigError(f"{what}: {error}") from None


def check_teacher_file(cfg: Config) -> int:
    """The teacher's output width; when a checkpoint is given, its keys and shapes must fit the tower."""
    t = cfg.teacher
    if t.random_init or not t.checkpoint:  # an empty checkpoint without random_init fails in validate
        return teacher_out_dim(t.name)
    return check_teacher_weights(t, read_shapes(t.checkpoint, "teacher.checkpoint"))  # TeacherLoadError if unfit


def check_init_from_file(cfg: Config, teacher_dim: int) -> None:
    path = cfg.model.init_from
    if not path:
        return
    state = read_shapes(path, "model.init_from")
    with torch.device("meta"):
        model = build_model(cfg.model, teacher_dim)
    check_init_from(model, state, path)  # LayoutError (a ConfigError) naming what does not fit


def check_resume_target(resume: str) -> None:
    """An explicit `--resume PATH` must lead to a checkpoint whose COMPLETE marker and every rank's
    files are there (auto/none need nothing: auto starts fresh when the output dir has none)."""
    if resume in ("auto", "none"):
        return
    try:
        tag_dir = resolve_checkpoint_path(Path(resume))
    except CheckpointError as error:
        raise ConfigError(str(error)) from None
    record = read_complete(tag_dir) or {}
    world, stage = record.get("world_size"), record.get("zero_stage", 3)
    if not isinstance(world, int) or world < 1:
        raise ConfigError(
            f"checkpoint {tag_dir}: its COMPLETE marker has no world_size (not written by eva-train); "
            f"start from its weights with --model.init_from instead"
        )
    names = {p.name for p in tag_dir.iterdir()}
    wanted = ["mp_rank_00_model_states.pt"] if stage in (0, 1, 2) else []
    if stage in (1, 2, 3):
        wanted += [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    if stage == 3:
        wanted += [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)]
    missing = [w for w in wanted if not any(n == w or n.endswith("_" + w) for n in names)]
    if missing:
        raise ConfigError(
            f"checkpoint {tag_dir} is incomplete: {len(missing)} file(s) missing "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); resume from another "
            f"checkpoint or use --resume none"
        )
