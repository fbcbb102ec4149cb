"""What the planner needs to know of a recipe's student and teacher, read off the real modules built
on the meta device (no memory, no weights file): parameter counts, sizes and FLOPs come from the same
code that trains, not from a second description of the architectures."""

from dataclasses import dataclass

import torch

from eva_train.config import Config
from eva_train.data.masking import scaled_patch_count
from eva_train.models import build_model, flops
from eva_train.models.variants import VARIANTS, num_checkpointed_blocks
from eva_train.plan.memory import StudentShape, TeacherShape


@dataclass(frozen=True)
class RecipeShapes:
    student: StudentShape
    teacher: TeacherShape | None
    train_flops_per_image: float  # student 3x forward + recompute + teacher forward (flops.py)


def _meta_teacher(cfg: Config, grid: int):
    # teacher.py imports open_clip (seconds): only when a recipe is planned
    from eva_train.models import teacher as teacher_module

    tower_cfg = teacher_module._model_config(cfg.teacher.name)
    with torch.device("meta"):
        visual, out_dim = teacher_module._build_tower(cfg.teacher.name, tower_cfg, None)
        patch = teacher_module._tower_patch_size(visual)
        return teacher_module.Teacher(visual, out_dim, grid * patch, None)


def _teacher_shape(teacher) -> TeacherShape:
    visual = teacher.visual
    blocks = visual.transformer.resblocks if hasattr(visual, "transformer") else visual.trunk.blocks
    linears = [m for m in blocks[0].mlp.modules() if isinstance(m, torch.nn.Linear)]
    width = linears[0].in_features
    grid = teacher.input_px // teacher_patch(teacher)
    return TeacherShape(
        params=sum(p.numel() for p in visual.parameters()),
        width=width,
        mlp_hidden=max(m.out_features for m in linears),
        tokens=grid * grid + 1,
        out_dim=teacher.out_dim,
        input_px=teacher.input_px,
    )


def teacher_patch(teacher) -> int:
    from eva_train.models import teacher as teacher_module

    return teacher_module._tower_patch_size(teacher.visual)


def recipe_shapes(cfg: Config, persistence_threshold: float = 1e5) -> RecipeShapes:
    arch = VARIANTS[cfg.model.variant]
    grid = cfg.model.img_size // arch.patch_size
    masked = scaled_patch_count(cfg.mask.num_masking_patches, (grid, grid))
    teacher = _meta_teacher(cfg, grid)
    with torch.device("meta"):
        model = build_model(cfg.model, teacher.out_dim)
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    student = StudentShape(
        arch=arch,
        params=sum(sizes),
        persistent_params=sum(n for n in sizes if n < persistence_threshold),
        largest_param=max(sizes),
        img_size=cfg.model.img_size,
        masked_patches=masked,
        teacher_dim=teacher.out_dim,
        checkpointed_blocks=num_checkpointed_blocks(cfg.model.checkpoint_fraction, arch.depth),
    )
    train_flops = flops.train_flops_per_image(cfg.model, teacher.forward_flops_per_image(), teacher.out_dim, masked)
    return RecipeShapes(student=student, teacher=_teacher_shape(teacher), train_flops_per_image=train_flops)
