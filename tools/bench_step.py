#!/usr/bin/env python
"""Time training steps of an EVA variant: plain torch (runs on a bare GPU image) or the real DeepSpeed
engine (--engine deepspeed: ZeRO from ds_configs/, bf16, activation checkpointing, one rank).

One step = student forward on a masked batch + negative-cosine loss against fixed random teacher
targets + backward + AdamW step (the teacher's forward is not run: MFU counts student FLOPs only).
Warm-up steps are discarded; the median of --steps is reported. Implementations (--impls): eva_train
(our model with --kernels), eva_train_torch (our model, EVA_KERNELS=torch references), timm (timm's
`Eva` with the same dimensions: full-token forward, then the same head on masked tokens). MFU uses the
one GPU table (eva_train/plan/gpus.py). --csv PATH writes the table for `tools/plan.py --measured`.

    python tools/bench_step.py --variant eva_demo_p8 --img_size 64 --micro_batch_size 32 --baseline timm
    python tools/bench_step.py --variant eva_g_p14 --micro_batch_size 32 --engine deepspeed \
        --checkpoint_fraction 1 --impls eva_train,eva_train_torch,timm --csv bench_step.csv
"""

import argparse
import csv
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TEACHER_DIM = 768
IMPLS = ("eva_train", "eva_train_torch", "timm")
CSV_FIELDS = (
    "device",
    "variant",
    "img_size",
    "micro_batch_size",
    "precision",
    "engine",
    "zero_stage",
    "checkpoint_fraction",
    "impl",
    "kernels",
    "step_ms",
    "images_per_s",
    "mfu",
    "peak_mem_gib",
    "flops_per_image",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="eva_demo_p8")
    p.add_argument("--img_size", type=int, default=None, help="default: the variant's")
    p.add_argument("--micro_batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup_steps", type=int, default=3)
    p.add_argument("--precision", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--kernels", choices=("auto", "triton", "torch", "apex"), default="auto")
    p.add_argument(
        "--checkpoint_fraction", type=float, default=0.0, help="activation checkpointing (timm: all or none)"
    )
    p.add_argument("--mask_ratio", type=float, default=0.4)
    p.add_argument("--baseline", choices=("none", "timm"), default="none", help="same as adding timm to --impls")
    p.add_argument("--impls", default="eva_train", help=f"comma-separated, of {', '.join(IMPLS)}")
    p.add_argument("--engine", choices=("torch", "deepspeed"), default="torch")
    p.add_argument("--zero_stage", type=int, choices=(1, 2, 3), default=3, help="--engine deepspeed only")
    p.add_argument("--csv", default=None, help="also write the table as CSV (tools/plan.py --measured reads it)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    args.impls = [i for i in args.impls.split(",") if i] + (["timm"] if args.baseline == "timm" else [])
    unknown = [i for i in args.impls if i not in IMPLS]
    if unknown or not args.impls:
        p.error(f"--impls {','.join(unknown) or '(empty)'} is unknown; use some of {', '.join(IMPLS)}")
    from eva_train.models.variants import VARIANTS

    if args.variant not in VARIANTS:
        p.error(f"--variant {args.variant} is unknown; choose one of {', '.join(sorted(VARIANTS))}")
    cfg = VARIANTS[args.variant]
    args.img_size = args.img_size or cfg.default_img_size
    if args.img_size % cfg.patch_size:
        p.error(f"--img_size {args.img_size} is not divisible by patch size {cfg.patch_size} of {args.variant}")
    if args.precision == "fp16" and args.device == "cpu":
        p.error("--precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    return args


def build_ours(args) -> torch.nn.Module:
    from eva_train.config import ModelConfig
    from eva_train.models import build_model

    return build_model(
        ModelConfig(
            variant=args.variant,
            img_size=args.img_size,
            drop_path_rate=0.0,
            checkpoint_fraction=args.checkpoint_fraction,
        ),
        TEACHER_DIM,
    )


class TimmMIM(torch.nn.Module):
    """timm Eva with our variant's dimensions, + mask token and head: the same MIM step."""

    def __init__(self, args):
        super().__init__()
        from timm.models.eva import Eva

        from eva_train.models.variants import VARIANTS

        c = VARIANTS[args.variant]
        self.eva = Eva(
            img_size=args.img_size,
            patch_size=c.patch_size,
            num_classes=0,
            embed_dim=c.embed_dim,
            depth=c.depth,
            num_heads=c.num_heads,
            qkv_bias=c.qkv_bias or c.k_bias,
            qkv_fused=c.qkv_fused,
            mlp_ratio=c.mlp_hidden_dim / c.embed_dim,
            swiglu_mlp=c.swiglu,
            scale_mlp=c.sub_ln,
            use_rot_pos_emb=c.rope,
            ref_feat_shape=c.rope_ref_grid if c.rope else None,
        )
        self.eva.set_grad_checkpointing(args.checkpoint_fraction > 0)
        self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.head = torch.nn.Linear(c.embed_dim, TEACHER_DIM)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        e = self.eva
        tokens = e.patch_embed(x)  # (B, N, D)
        tokens = torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens, rope = e._pos_embed(tokens)
        for block in e.blocks:
            tokens = block(tokens, rope=rope)
        return self.head(e.norm(tokens)[:, 1:][mask])  # (M, TEACHER_DIM)


def synthetic_inputs(args, device: torch.device):
    grid = args.img_size // model_patch(args)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.micro_batch_size, 3, args.img_size, args.img_size, generator=g).to(device)
    mask = torch.rand(args.micro_batch_size, grid * grid, generator=g).argsort(1) < int(args.mask_ratio * grid * grid)
    target = torch.randn(args.micro_batch_size, grid * grid, TEACHER_DIM, generator=g).to(device)
    return images, mask.to(device), target


def make_step(model: torch.nn.Module, args) -> Callable[[], None]:
    """Plain torch: autocast to the precision, fused AdamW on CUDA."""
    from eva_train.train.objective import masked_cosine_loss

    device, dtype = torch.device(args.device), DTYPES[args.precision]
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    images, mask, target = synthetic_inputs(args, device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            pred = model(images, mask)
        masked_cosine_loss(pred, target, mask).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def ds_config(args) -> dict:
    import json

    raw = json.loads((Path(__file__).resolve().parents[1] / "ds_configs" / f"zero{args.zero_stage}.json").read_text())
    return dict(
        raw,
        train_batch_size=args.micro_batch_size,
        train_micro_batch_size_per_gpu=args.micro_batch_size,
        gradient_accumulation_steps=1,
        gradient_clipping=3.0,
        bf16={"enabled": args.precision == "bf16"},
        fp16={"enabled": args.precision == "fp16", "loss_scale": 0},
    )


def make_ds_step(build: Callable[[], torch.nn.Module], args) -> Callable[[], None]:
    """The DeepSpeed engine as pretraining runs it (one rank): built under zero.Init at ZeRO-3, inputs
    in the engine's dtype, engine.backward / engine.step."""
    # timm (and torch._dynamo with it) is imported before zero.Init patches tensor creation: inside the
    # context dynamo's import-time signature checks fail
    import deepspeed
    import timm.models.eva  # noqa: F401

    from eva_train.train.objective import masked_cosine_loss

    config = ds_config(args)
    with deepspeed.zero.Init(config_dict_or_path=config, enabled=args.zero_stage == 3):
        model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.device.startswith("cuda"))
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    images, mask, target = synthetic_inputs(args, engine.device)
    images = images.to(DTYPES[args.precision] or torch.float32)

    def step() -> None:
        engine.backward(masked_cosine_loss(engine(images, mask), target, mask))
        engine.step()

    return step


def model_patch(args) -> int:
    from eva_train.models.variants import VARIANTS

    return VARIANTS[args.variant].patch_size


def time_steps(step: Callable[[], None], args) -> dict[str, float]:
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup_steps):
        step()
    sync()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"step_s": step_s, "images_per_sec": args.micro_batch_size / step_s, "peak_mem_gib": peak}


def flops_per_image(args) -> float:
    from eva_train.config import ModelConfig
    from eva_train.models.flops import train_flops_per_image

    grid = args.img_size // model_patch(args)
    cfg = ModelConfig(variant=args.variant, img_size=args.img_size, checkpoint_fraction=args.checkpoint_fraction)
    return train_flops_per_image(cfg, 0.0, TEACHER_DIM, int(args.mask_ratio * grid * grid))  # no teacher here


def init_single_rank() -> None:
    """One-rank process group for --engine deepspeed (outside a launcher)."""
    from eva_train.runtime.distributed import init_process_group, world_from_env

    for key, value in (
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29533"),
    ):
        os.environ.setdefault(key, value)
    init_process_group(world_from_env(), 1800)


def run_impl(impl: str, args) -> dict[str, float]:
    import eva_kernels

    eva_kernels.set_backend("torch" if impl == "eva_train_torch" else args.kernels)
    torch.manual_seed(0)
    build = (lambda: TimmMIM(args)) if impl == "timm" else (lambda: build_ours(args))
    step = make_ds_step(build, args) if args.engine == "deepspeed" else make_step(build(), args)
    result = time_steps(step, args)
    result["kernels"] = "timm" if impl == "timm" else eva_kernels.describe()["backend"]
    return result


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from eva_train.plan.gpus import mfu, peak_flops

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    peak = peak_flops(device_name, args.precision)
    if args.engine == "deepspeed":
        init_single_rank()
    fpi = flops_per_image(args)
    results = [(impl, run_impl(impl, args)) for impl in args.impls]
    engine = f"DeepSpeed ZeRO-{args.zero_stage}" if args.engine == "deepspeed" else "plain torch"
    print(
        f"\n{args.variant} img {args.img_size} batch {args.micro_batch_size} {args.precision} on {device_name}, "
        f"{engine}, checkpoint fraction {args.checkpoint_fraction:g}, median of {args.steps} steps after "
        f"{args.warmup_steps} warm-up"
    )
    print(f"{'impl':<16} {'kernels':<8} {'step ms':>9} {'img/s':>9} {'MFU':>7} {'peak GiB':>9} {'speedup':>8}")
    rows = []
    for impl, r in results:
        utilisation = mfu(fpi, r["images_per_sec"], 1, peak) if peak else None
        speedup = results[-1][1]["step_s"] / r["step_s"]
        print(
            f"{impl:<16} {r['kernels']:<8} {r['step_s'] * 1e3:>9.1f} {r['images_per_sec']:>9.1f} "
            f"{f'{utilisation:.1%}' if utilisation else 'n/a':>7} {r['peak_mem_gib']:>9.2f} {speedup:>7.2f}x"
        )
        rows.append(
            {
                "device": device_name,
                "variant": args.variant,
                "img_size": args.img_size,
                "micro_batch_size": args.micro_batch_size,
                "precision": args.precision,
                "engine": args.engine,
                "zero_stage": args.zero_stage if args.engine == "deepspeed" else "",
                "checkpoint_fraction": args.checkpoint_fraction,
                "impl": impl,
                "kernels": r["kernels"],
                "step_ms": round(r["step_s"] * 1e3, 3),
                "images_per_s": round(r["images_per_sec"], 3),
                "mfu": "" if utilisation is None else round(utilisation, 4),
                "peak_mem_gib": round(r["peak_mem_gib"], 3),
                "flops_per_image": fpi,
            }
        )
    if args.csv:
        write_csv(args.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
