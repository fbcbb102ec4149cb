"""Does a fine-tune recipe (eva_train/eval/recipes/*.toml, protocol finetune) fit on a card at its
micro batch? The same memory model as pretraining, with a classifier instead of the MIM head and no
teacher. Every recipe in the folder is planned, so a new recipe costs nothing here."""

import dataclasses

import torch

from eva_train.eval.protocol_config import RECIPE_DIR, build_protocol_config
from eva_train.models import build_backbone
from eva_train.models.variants import VARIANTS, num_checkpointed_blocks
from eva_train.plan import memory
from eva_train.plan.gpus import GpuSpec

IMAGENET_CLASSES = 1000  # the seed's fine-tune rows; a recipe's class count comes from its data at run time
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def finetune_recipes() -> list[str]:
    names = sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))
    return [n for n in names if build_protocol_config(n).train.protocol == "finetune"]


def plan_finetune(recipe: str, world: int, gpu: GpuSpec) -> dict:
    cfg = build_protocol_config(recipe)
    t, m = cfg.train, cfg.model
    if not m.variant or m.variant not in VARIANTS:
        return {"recipe": cfg.recipe, "fits": None, "detail": "variant comes from the checkpoint: not planned"}
    arch = VARIANTS[m.variant]
    if m.depth:  # a smoke run's shallower model
        arch = dataclasses.replace(arch, depth=m.depth)
    img_size = m.img_size or arch.default_img_size
    with torch.device("meta"):
        backbone = build_backbone(m.variant, img_size=img_size, **({"depth": m.depth} if m.depth else {}))
    sizes = [p.numel() for p in backbone.parameters()] + [arch.embed_dim * IMAGENET_CLASSES, IMAGENET_CLASSES]
    student = memory.StudentShape(
        arch=arch,
        params=sum(sizes),
        persistent_params=sum(n for n in sizes if n < 1e5),
        largest_param=max(sizes),
        img_size=img_size,
        masked_patches=0,
        teacher_dim=0,
        checkpointed_blocks=num_checkpointed_blocks(m.checkpoint_fraction, arch.depth),
    )
    zero = memory.ZeroSettings(stage=max(1, t.zero_stage), overlap_comm=t.zero_stage == 3)
    ranks = world if t.zero_stage > 0 else 1  # stage 0: nothing partitioned
    dtype_bytes = DTYPE_BYTES.get(t.precision, 4)
    mem = memory.predict(student, None, zero, ranks, t.micro_batch_size, dtype_bytes, on_gpu=True)
    peak = mem.peak + (4.0 * student.params if cfg.aug.ema_decay > 0 else 0.0)  # EMA weights, kept in fp32
    usable = gpu.memory_bytes * (1 - memory.WORKSPACE_FRACTION)
    verdict = "fits" if peak <= usable else "DOES NOT FIT"
    detail = (
        f"{m.variant} at {img_size}px, micro batch {t.micro_batch_size}, checkpointing "
        f"{student.checkpointed_blocks}/{arch.depth} blocks, ZeRO-{t.zero_stage} on {ranks} "
        f"rank(s): {peak / 2**30:.1f} GiB of {usable / 2**30:.1f} GiB -> {verdict}"
    )
    return {"recipe": cfg.recipe, "fits": peak <= usable, "peak_bytes": peak, "detail": detail}
