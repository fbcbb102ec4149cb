#!/usr/bin/env python
"""Time training steps of an EVA variant (plain torch: no DeepSpeed, so it runs on a bare GPU image).

One step = student forward on a masked batch + negative-cosine loss against fixed random teacher
targets + backward + AdamW step. Warm-up steps are discarded; the median of --steps is reported.
With --baseline timm, timm's `Eva` with the same dimensions runs the same step (full-token forward,
then the same head on masked tokens) in the same process, and the ratio is printed.

    python tools/bench_step.py --variant eva_demo_p8 --img_size 64 --micro_batch_size 32 --baseline timm
    python tools/bench_step.py --variant eva_g_p14 --micro_batch_size 32 --precision bf16 --kernels auto --baseline timm
"""
import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TEACHER_DIM = 768


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="eva_demo_p8")
    p.add_argument("--img_size", type=int, default=None, help="default: the variant's")
    p.add_argument("--micro_batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup_steps", type=int, default=3)
    p.add_argument("--precision", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--kernels", choices=("auto", "triton", "torch", "apex"), default="auto")
    p.add_argument("--checkpoint_fraction", type=float, default=0.0, help="activation checkpointing (timm: all or none)")
    p.add_argument("--mask_ratio", type=float, default=0.4)
    p.add_argument("--baseline", choices=("none", "timm"), default="none")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
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

    return build_model(ModelConfig(variant=args.variant, img_size=args.img_size, drop_path_rate=0.0,
                                   checkpoint_fraction=args.checkpoint_fraction), TEACHER_DIM)


class TimmMIM(torch.nn.Module):
    """timm Eva with our variant's dimensions, + mask token and head: the same MIM step."""

    def __init__(self, args):
        super().__init__()
        from timm.models.eva import Eva

        from eva_train.models.variants import VARIANTS

        c = VARIANTS[args.variant]
        self.eva = Eva(img_size=args.img_size, patch_size=c.patch_size, num_classes=0, embed_dim=c.embed_dim,
                       depth=c.depth, num_heads=c.num_heads, qkv_bias=c.qkv_bias or c.k_bias, qkv_fused=c.qkv_fused,
                       mlp_ratio=c.mlp_hidden_dim / c.embed_dim, swiglu_mlp=c.swiglu, scale_mlp=c.sub_ln,
                       use_rot_pos_emb=c.rope, ref_feat_shape=c.rope_ref_grid if c.rope else None)
        self.eva.set_grad_checkpointing(args.checkpoint_fraction > 0)
        self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.head = torch.nn.Linear(c.embed_dim, TEACHER_DIM)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        e = self.eva
        tokens = e.patch_embed(x)                                                   # (B, N, D)
        tokens = torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens, rope = e._pos_embed(tokens)
        for block in e.blocks:
            tokens = block(tokens, rope=rope)
        return self.head(e.norm(tokens)[:, 1:][mask])                              # (M, TEACHER_DIM)


def make_step(model: torch.nn.Module, args) -> Callable[[], None]:
    from eva_train.train.objective import masked_cosine_loss

    device, dtype = torch.device(args.device), DTYPES[args.precision]
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    grid = args.img_size // model_patch(args)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.micro_batch_size, 3, args.img_size, args.img_size, generator=g).to(device)
    mask = torch.rand(args.micro_batch_size, grid * grid, generator=g).argsort(1) < int(args.mask_ratio * grid * grid)
    mask = mask.to(device)
    target = torch.randn(args.micro_batch_size, grid * grid, TEACHER_DIM, generator=g).to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            pred = model(images, mask)
        masked_cosine_loss(pred, target, mask).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def model_patch(args) -> int:
    from eva_train.models.variants import VARIANTS

    return VARIANTS[args.variant].patch_size


def time_steps(step: Callable[[], None], args) -> Dict[str, float]:
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


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import eva_kernels
    from eva_train.train.metrics import peak_flops

    eva_kernels.set_backend(args.kernels)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    peak = peak_flops(device_name, args.precision)
    torch.manual_seed(0)
    rows = [("eva_train", time_steps(make_step(build_ours(args), args), args))]
    if args.baseline == "timm":
        torch.manual_seed(0)
        rows.append(("timm Eva", time_steps(make_step(TimmMIM(args), args), args)))
    fpi = flops_per_image(args)
    print(f"\n{args.variant} img {args.img_size} batch {args.micro_batch_size} {args.precision} on {device_name}, "
          f"kernels {eva_kernels.describe()['backend']}, median of {args.steps} steps after {args.warmup_steps} warm-up")
    print(f"{'impl':<10} {'step ms':>9} {'img/s':>9} {'MFU':>7} {'peak GiB':>9} {'speedup':>8}")
    for name, r in rows:
        mfu = f"{fpi * r['images_per_sec'] / peak:.1%}" if peak else "n/a"
        speedup = rows[-1][1]["step_s"] / r["step_s"]
        print(f"{name:<10} {r['step_s'] * 1e3:>9.1f} {r['images_per_sec']:>9.1f} {mfu:>7} {r['peak_mem_gib']:>9.2f} "
              f"{speedup:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
