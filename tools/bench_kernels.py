#!/usr/bin/env python
"""Microbenchmarks of the eva_kernels ops against their peers, at EVA-g and EVA-02-L shapes.

    python tools/bench_kernels.py [--batches 8 32 64] [--ops ...] [--modes fwd bwd fwd+bwd]
                                  [--providers ...] [--out-dir DIR] [--rep-ms 100]
    python tools/bench_kernels.py --cpu-smoke   # tiny shapes on CPU, Triton interpreter: plumbing only

Per op, shape, batch, mode and provider: the median time (`triton.testing.do_bench`, warm-up,
inputs rotated over more than twice the L2 so no run hits a warm cache), GB/s (LayerNorm, RoPE:
fewest bytes moved) or TFLOP/s (attention), the percentage of this card's measured copy
bandwidth / bf16 matmul rate, and ours' speed-up over the best peer. Every provider's outputs and
gradients are checked before it is timed, by the kernels' accuracy rule (`eva_kernels.accuracy`:
float64 reference, eager PyTorch at the same precision as the yardstick); a wrong one or one that
does not run here is reported, not timed. "ours" calls the Triton kernels directly, not through
the backend switch: $EVA_KERNELS and the self-check's choice do not change what is timed.
Writes bench_kernels.csv and bench_kernels.png to --out-dir; prints a short table last.
"""

import argparse
import os
import sys

if "--cpu-smoke" in sys.argv:  # triton.jit picks the interpreter when kernels are defined: set it first
    os.environ["TRITON_INTERPRET"] = "1"

import csv  # noqa: E402
import dataclasses  # noqa: E402
import itertools  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.testing  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from eva_kernels import reference  # noqa: E402
from eva_kernels.accuracy import as_tuple, atol_for, leaf_copies, outputs_and_grads, tolerance_problem  # noqa: E402
from eva_kernels.attention import attention as triton_attention  # noqa: E402
from eva_kernels.layer_norm import layer_norm as triton_layer_norm  # noqa: E402
from eva_kernels.rope import rope_2d as triton_rope_2d  # noqa: E402

OPS = ("layer_norm", "add_layer_norm", "rope_2d", "attention")
MODES = ("fwd", "bwd", "fwd+bwd")


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    heads: int
    grid: int  # patches per side
    prefix_tokens: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def tokens(self) -> int:
        return self.grid**2 + self.prefix_tokens


SHAPES = (Shape("eva_g_p14", 1408, 16, 16), Shape("eva02_l_p14", 1024, 16, 16))
SMOKE_SHAPES = (Shape("smoke_hd88", 176, 2, 3), Shape("smoke_hd64", 128, 2, 2))


# ---------------------------------------------------------------- inputs and providers
def make_inputs(op: str, shape: Shape, batch: int, dtype, device) -> tuple:
    """One set of random inputs (never zeros) for `op`; tensors that get gradients require them."""

    def rand(*size, grad=True):
        return torch.randn(*size, dtype=dtype, device=device).requires_grad_(grad)

    if op in ("layer_norm", "add_layer_norm"):
        x = rand(batch, shape.tokens, shape.hidden)
        w, b = rand(shape.hidden), rand(shape.hidden)
        return (x, w, b, rand(batch, shape.tokens, shape.hidden)) if op == "add_layer_norm" else (x, w, b)
    qkv_shape = (batch, shape.heads, shape.tokens, shape.head_dim)
    if op == "rope_2d":
        patches = shape.tokens - shape.prefix_tokens
        angles = torch.rand(patches, shape.head_dim, device=device) * 6.28
        return rand(*qkv_shape), rand(*qkv_shape), angles.sin(), angles.cos()
    return rand(*qkv_shape), rand(*qkv_shape), rand(*qkv_shape)


def _sdpa_with(backend):
    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def _apex_layer_norm() -> Callable | None:
    try:  # NVIDIA apex only: PyPI's `apex` is an unrelated package without `apex.normalization`
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine
    except ImportError:
        return None
    return lambda x, w, b, r=None: fused_layer_norm_affine(x if r is None else x + r, w, b, x.shape[-1:], 1e-6)


def _liger_layer_norm() -> Callable | None:
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    except ImportError:
        return None
    return lambda x, w, b, r=None: LigerLayerNormFunction.apply(x if r is None else x + r, w, b, 1e-6)


def providers_for(op: str, wanted: list[str], device) -> dict[str, Callable]:
    """name -> function of the op's inputs; peers not installed here are left out."""
    if op in ("layer_norm", "add_layer_norm"):
        ours = lambda x, w, b, r=None: triton_layer_norm(x, w, b, 1e-6, r)  # noqa: E731
        eager = lambda x, w, b, r=None: reference.layer_norm(x, w, b, 1e-6, r)  # noqa: E731
        found = {"ours": ours, "torch": eager, "apex": _apex_layer_norm(), "liger": _liger_layer_norm()}
    elif op == "rope_2d":
        ours = lambda q, k, s, c: triton_rope_2d(q, k, s, c, 1)  # noqa: E731
        eager = lambda q, k, s, c: reference.rope_2d(q, k, s, c, 1)  # noqa: E731
        found = {"ours": ours, "torch": eager}
    else:
        found = {
            "ours": triton_attention,
            "torch": reference.attention,
            "sdpa_flash": _sdpa_with(SDPBackend.FLASH_ATTENTION),
            "sdpa_cudnn": _sdpa_with(SDPBackend.CUDNN_ATTENTION),
            "sdpa_efficient": _sdpa_with(SDPBackend.EFFICIENT_ATTENTION),
            "sdpa_math": _sdpa_with(SDPBackend.MATH),
        }
    if "torch.compile" in wanted:
        found["torch.compile"] = torch.compile(found["torch"], dynamic=True)
    return {name: fn for name, fn in found.items() if fn is not None and name in wanted}


# ---------------------------------------------------------------- work and checking
def work_of(op: str, shape: Shape, batch: int, mode: str, element_bytes: int):
    """(amount, unit): fewest bytes for the memory-bound ops, FLOPs for attention."""
    if op == "attention":  # forward: QK^T and PV; backward 2.5x (FlashAttention's convention)
        fwd = 4 * batch * shape.heads * shape.tokens**2 * shape.head_dim
        return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode], "TFLOP/s"
    elements = batch * shape.tokens * shape.hidden
    tensors = {
        "layer_norm": {"fwd": 2, "bwd": 3},  # x, y | x, dy, dx
        "add_layer_norm": {"fwd": 4, "bwd": 4},  # x, r, sum, y | sum, dy, dsum, dx
        "rope_2d": {"fwd": 4, "bwd": 4},
    }[op]  # q, k in and out
    count = tensors["fwd"] + tensors["bwd"] if mode == "fwd+bwd" else tensors[mode]
    return count * elements * element_bytes, "GB/s"


def _yardsticks(op: str):
    """(float64 reference, eager PyTorch at the input precision): the accuracy rule's two yardsticks."""
    if op in ("layer_norm", "add_layer_norm"):
        return (
            lambda x, w, b, r=None: reference.layer_norm(x, w, b, 1e-6, r),
            lambda x, w, b, r=None: reference.layer_norm_same_precision(x, w, b, 1e-6, r),
        )
    if op == "rope_2d":
        return (
            lambda q, k, s, c: reference.rope_2d(q, k, s, c, 1),
            lambda q, k, s, c: reference.rope_2d_same_precision(q, k, s, c, 1),
        )
    return reference.attention, reference.attention_same_precision


def check_provider(op: str, fn: Callable, inputs: tuple) -> str | None:
    """None if fn's outputs and gradients pass the kernels' accuracy rule (`eva_kernels.accuracy`,
    the one the kernel tests and the run-time self-check use) on these inputs, else why not."""
    grad_inputs = [t for t in inputs if t.requires_grad]
    constants = [t.detach() for t in inputs if not t.requires_grad]
    ref64, same_precision = _yardsticks(op)
    with torch.no_grad():
        upstream = [torch.randn_like(o) for o in as_tuple(same_precision(*inputs))]
    try:
        got = outputs_and_grads(fn, leaf_copies(grad_inputs), constants, upstream)
    except Exception as error:  # a backend that does not run here (e.g. cuDNN on CPU)
        return f"unavailable: {type(error).__name__}: {str(error).splitlines()[0][:80]}"
    want = outputs_and_grads(ref64, leaf_copies(grad_inputs, torch.float64), [c.double() for c in constants], upstream)
    eager = outputs_and_grads(same_precision, leaf_copies(grad_inputs), constants, upstream)
    n_outputs = len(upstream)
    rows = inputs[0].numel() // inputs[0].shape[-1]
    for i, (ours, torch_same, ref) in enumerate(zip(got, eager, want)):
        # gradients of 1-D inputs (LayerNorm's weight and bias) sum over every row
        summed = i >= n_outputs and grad_inputs[i - n_outputs].dim() == 1
        problem = tolerance_problem(
            f"output {i}" if i < n_outputs else f"grad {i - n_outputs}",
            ours,
            torch_same,
            ref,
            atol_for(inputs[0].dtype, rows if summed else 1),
        )
        if problem:
            return f"WRONG: {problem}"
    return None


# ---------------------------------------------------------------- timing
def rotation_count(inputs: tuple, device) -> int:
    """How many input sets to rotate through so that they span more than twice the L2."""
    if device.type != "cuda":
        return 2
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    set_bytes = sum(t.numel() * t.element_size() for t in inputs)
    return max(2, min(64, math.ceil(2 * l2_bytes / set_bytes)))


def median_ms(fn: Callable, device, rep_ms: int) -> float:
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median")
    fn()  # warm-up, then two host-timed runs (interpreter: plumbing, not speed)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def timed_call(fn: Callable, input_sets: list[tuple], mode: str) -> Callable:
    """A no-argument callable running `mode` on the next input set each call."""
    sets = itertools.cycle(range(len(input_sets)))
    grad_inputs = [[t for t in s if t.requires_grad] for s in input_sets]
    if mode == "bwd":  # graphs built once; each call runs one backward
        outs = [as_tuple(fn(*s)) for s in input_sets]
        upstream = [[torch.randn_like(o) for o in os_] for os_ in outs]

        def backward():
            i = next(sets)
            torch.autograd.grad(outs[i], grad_inputs[i], upstream[i], retain_graph=True)

        return backward
    upstream = [[torch.randn_like(o) for o in as_tuple(fn(*s))] for s in input_sets]

    def forward(with_backward=(mode == "fwd+bwd")):
        i = next(sets)
        result = as_tuple(fn(*input_sets[i]))
        if with_backward:
            torch.autograd.grad(result, grad_inputs[i], upstream[i])

    return forward


def measure_peaks(device, dtype) -> dict[str, float]:
    """This card's copy bandwidth (bytes read + written) and matmul rate, measured, not datasheet."""
    smoke = device.type != "cuda"
    numel = (1 << 20) if smoke else (1 << 30)  # 2 GiB of bf16 on a GPU: far beyond the L2
    src = torch.randn(numel, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), device, rep_ms=200)
    n = 256 if smoke else 8192
    a, b = (torch.randn(n, n, dtype=torch.float32 if smoke else dtype, device=device) for _ in range(2))
    matmul_ms = median_ms(lambda: a @ b, device, rep_ms=200)
    return {"copy_GB/s": 2 * numel * src.element_size() / copy_ms / 1e6, "matmul_TFLOP/s": 2 * n**3 / matmul_ms / 1e9}


@dataclasses.dataclass
class Row:
    op: str
    shape: str
    batch: int
    mode: str
    provider: str
    ms: float | None
    rate: float | None
    unit: str
    pct_of_peak: float | None
    speedup_vs_best_peer: float | None
    note: str


def bench_case(op, shape, batch, dtype, device, providers, modes, peaks, rep_ms) -> list[Row]:
    first = make_inputs(op, shape, batch, dtype, device)
    extra_sets = rotation_count(first, device) - 1
    input_sets = [first] + [make_inputs(op, shape, batch, dtype, device) for _ in range(extra_sets)]
    notes = {name: check_provider(op, fn, first) for name, fn in providers.items()}
    rows = []
    for mode in modes:
        amount, unit = work_of(op, shape, batch, mode, first[0].element_size())
        peak = peaks["matmul_TFLOP/s"] * 1e12 if unit == "TFLOP/s" else peaks["copy_GB/s"] * 1e9
        for name, fn in providers.items():
            ms = None if notes[name] else median_ms(timed_call(fn, input_sets, mode), device, rep_ms)
            rate = amount / (ms * 1e-3) if ms else None
            rows.append(
                Row(
                    op,
                    shape.name,
                    batch,
                    mode,
                    name,
                    ms,
                    rate / (1e12 if unit == "TFLOP/s" else 1e9) if rate else None,
                    unit,
                    100 * rate / peak if rate else None,
                    None,
                    notes[name] or "",
                )
            )
        _fill_speedup(rows[-len(providers) :])
    return rows


def _fill_speedup(rows: list[Row]) -> None:
    ours = next((r for r in rows if r.provider == "ours" and r.ms), None)
    peers = [r.ms for r in rows if r.provider != "ours" and r.ms]
    if ours and peers:
        ours.speedup_vs_best_peer = min(peers) / ours.ms


def write_csv(rows: list[Row], path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([field.name for field in dataclasses.fields(Row)])
        writer.writerows(dataclasses.astuple(row) for row in rows)
    os.replace(tmp, path)


def plot_png(rows: list[Row], path: str, mode: str = "fwd+bwd") -> None:
    """One panel per (op, shape): ms against batch size per provider, for `mode`."""
    import matplotlib  # a dev extra, needed only for the PNG: imported where it is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r.op, r.shape) for r in rows})
    columns = min(4, len(panels))
    grid_rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(grid_rows, columns, figsize=(4.2 * columns, 3.5 * grid_rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (op, shape) in zip(axes.flat, panels):
        selected = [r for r in rows if (r.op, r.shape, r.mode) == (op, shape, mode) and r.ms]
        for provider in sorted({r.provider for r in selected}):
            points = sorted((r.batch, r.ms) for r in selected if r.provider == provider)
            ax.plot(*zip(*points), marker="o", label=provider, linewidth=2.5 if provider == "ours" else 1)
        ax.set(title=f"{op} {shape} ({mode})", xlabel="batch (images)", ylabel="ms (median)", xscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(rows: list[Row], peaks: dict[str, float], device_name: str) -> None:
    print(
        f"\ndevice: {device_name}; measured copy {peaks['copy_GB/s']:.0f} GB/s, "
        f"matmul {peaks['matmul_TFLOP/s']:.1f} TFLOP/s"
    )
    print(
        f"{'op':15} {'shape':12} {'batch':>5} {'mode':8} {'provider':15} {'ms':>9} {'rate':>14} {'%peak':>6} "
        f"{'vs best':>7}  note"
    )
    for r in rows:
        ms = f"{r.ms:9.4f}" if r.ms else f"{'-':>9}"
        rate = f"{r.rate:8.3g} {r.unit:>5}" if r.rate else f"{'-':>14}"
        pct = f"{r.pct_of_peak:5.1f}%" if r.pct_of_peak else f"{'-':>6}"
        speedup = f"{r.speedup_vs_best_peer:6.2f}x" if r.speedup_vs_best_peer else f"{'':7}"
        print(
            f"{r.op:15} {r.shape:12} {r.batch:5d} {r.mode:8} {r.provider:15} {ms} {rate} {pct} {speedup}  {r.note[:60]}"
        )


def print_summary(csv_path: str, mode: str = "fwd+bwd") -> None:
    """A compact table from a CSV: per case, ours against the best peer; its last line is a
    one-line verdict (gpu_check.sh puts it in its closing table)."""
    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r["mode"] == mode]
    print(
        f"{'op':15} {'shape':12} {'batch':>5} {'ours ms':>9} {'best peer':>15} {'peer ms':>9} {'speedup':>7} "
        f"{'ours %peak':>10}  ({mode})"
    )
    speedups, failed = [], []
    for key in sorted({(r["op"], r["shape"], int(r["batch"])) for r in rows}):
        case = [r for r in rows if (r["op"], r["shape"], int(r["batch"])) == key]
        ours = next((r for r in case if r["provider"] == "ours"), None)
        peers = sorted((float(r["ms"]), r["provider"]) for r in case if r["provider"] != "ours" and r["ms"])
        if ours and not ours["ms"]:
            failed.append(f"{key[0]} {key[1]} b{key[2]}: {ours['note'][:50]}")
            ours = None
        ours_ms = f"{float(ours['ms']):9.4f}" if ours else f"{'-':>9}"
        peer_ms, peer = (f"{peers[0][0]:9.4f}", peers[0][1]) if peers else (f"{'-':>9}", "-")
        speedup = peers[0][0] / float(ours["ms"]) if ours and peers else None
        if speedup:
            speedups.append((speedup, f"{key[0]} {key[1]} b{key[2]} vs {peer}"))
        speedup_text = f"{speedup:6.2f}x" if speedup else f"{'-':>7}"
        pct = f"{float(ours['pct_of_peak']):9.1f}%" if ours and ours["pct_of_peak"] else f"{'-':>10}"
        print(f"{key[0]:15} {key[1]:12} {key[2]:5d} {ours_ms} {peer:>15} {peer_ms} {speedup_text} {pct}")
    print(kernel_verdict(speedups, failed))


def kernel_verdict(speedups: list[tuple], failed: list[str]) -> str:
    """One line: wrong kernels first (numerics before speed), then how often ours beats the best peer."""
    if failed:
        return f"ours FAILED the accuracy check in {len(failed)} case(s), e.g. {failed[0]}"
    if not speedups:
        return "no case with both ours and a peer timed"
    wins = sum(s >= 1.0 for s, _ in speedups)
    worst = min(speedups)
    return f"ours >= best peer in {wins}/{len(speedups)} cases; worst {worst[0]:.2f}x ({worst[1]})"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="images per batch (default 8 32 64)")
    parser.add_argument(
        "--providers",
        nargs="+",
        default=None,
        help="subset of: ours torch torch.compile apex liger sdpa_flash sdpa_cudnn sdpa_efficient sdpa_math",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time per measurement")
    parser.add_argument("--out-dir", default=".")
    parser.add_argument("--summary-from", metavar="CSV", help="only print ours-vs-best-peer from an earlier CSV")
    args = parser.parse_args(argv)
    if args.summary_from:
        return args
    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("no CUDA device here; run on a GPU, or --cpu-smoke to check the plumbing on CPU")
    args.batches = args.batches or ([1, 2] if args.cpu_smoke else [8, 32, 64])
    default_providers = ["ours", "torch", "apex", "liger", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math"]
    args.providers = args.providers or default_providers + ([] if args.cpu_smoke else ["torch.compile"])
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.summary_from:
        print_summary(args.summary_from)
        return
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = torch.float32 if args.cpu_smoke else getattr(torch, args.dtype)  # CPU bf16 matmuls: too slow
    device_name = "CPU (Triton interpreter)" if args.cpu_smoke else torch.cuda.get_device_name(device)
    peaks = measure_peaks(device, dtype)
    providers = {op: providers_for(op, args.providers, device) for op in args.ops}  # one torch.compile per op
    os.makedirs(args.out_dir, exist_ok=True)
    rows = []
    for shape, batch, op in itertools.product(SMOKE_SHAPES if args.cpu_smoke else SHAPES, args.batches, args.ops):
        rows += bench_case(op, shape, batch, dtype, device, providers[op], args.modes, peaks, args.rep_ms)
        # rewritten after every case: a run stopped by gpu_check's time cap keeps what it measured
        write_csv(rows, os.path.join(args.out_dir, "bench_kernels.csv"))
        print(f"done {op} {shape.name} batch {batch}", flush=True)
    plot_png(rows, os.path.join(args.out_dir, "bench_kernels.png"))
    print_table(rows, peaks, device_name)


if __name__ == "__main__":
    main()
