"""Compile the Triton kernels for a GPU target without a GPU (Triton ships ptxas), to catch what
the interpreter cannot see: compile-mode errors, shared-memory overruns, register spills.

    python -m eva_kernels.compile_check [--quick] [--arch 90]

Run with TRITON_INTERPRET unset (interpreted kernels cannot be compiled). Prints one line per
kernel configuration (the launch configurations the host functions use) and exits non-zero on
the first failure.
"""

import argparse
import os
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from eva_kernels.attention import (
    _attn_bwd_delta_kernel,
    _attn_bwd_dkdv_kernel,
    _attn_bwd_dq_kernel,
    _attn_fwd_kernel,
    head_dim_chunks,
    launch_config,
)
from eva_kernels.layer_norm import _ln_bwd_kernel, _ln_fwd_kernel, _num_warps
from eva_kernels.rope import _rope_kernel

FP32_POINTERS = {"lse_ptr", "delta_ptr", "mean_ptr", "rstd_ptr", "dw_part_ptr", "db_part_ptr", "sin_ptr", "cos_ptr"}
FP32_SCALARS = {"qk_scale_log2", "scale", "eps"}
MAX_SHARED_BYTES = {80: 163 * 1024, 90: 227 * 1024}  # per block, opt-in maximum (A100, H100/H200)


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    def arg_type(name):
        if name in constexprs:
            return "constexpr"
        if name.endswith("_ptr"):
            return "*fp32" if name in FP32_POINTERS else f"*{dtype}"
        return "fp32" if name in FP32_SCALARS else "i32"

    return {name: arg_type(name) for name in fn.arg_names}


def compile_kernel(fn, dtype: str, constexprs: dict, target: GPUTarget, **options) -> str:
    start = time.perf_counter()
    kernel = triton.compile(
        ASTSource(fn, _signature(fn, dtype, constexprs), constexprs=constexprs), target=target, options=options
    )
    if kernel.metadata.shared > MAX_SHARED_BYTES.get(target.arch, MAX_SHARED_BYTES[90]):
        raise RuntimeError(
            f"{fn.__name__} {dtype} {constexprs}: {kernel.metadata.shared} B of shared memory "
            f"exceed sm_{target.arch}'s per-block limit; use smaller blocks in launch_config"
        )
    return (
        f"ok {fn.__name__:23} {dtype:5} {constexprs} shared={kernel.metadata.shared}B "
        f"warps={kernel.metadata.num_warps} ({time.perf_counter() - start:.1f}s)"
    )


def attention_configs(head_dims, dtypes, n_tokens=257):
    """(kernel, dtype, constexprs, options) as `attention_fwd`/`attention_bwd` launch them on a GPU."""
    for dtype in dtypes:
        for head_dim in head_dims:
            d0, d1 = head_dim_chunks(head_dim)
            common = dict(D0=d0, D1=d1, UPCAST=dtype == "fp32")
            block_m, block_n, warps, stages = launch_config(head_dim, n_tokens, True, backward=False)
            yield (
                _attn_fwd_kernel,
                dtype,
                {**common, "BLOCK_M": block_m, "BLOCK_N": block_n},
                dict(num_warps=warps, num_stages=stages),
            )
            block_m, block_n, warps, stages = launch_config(head_dim, n_tokens, True, backward=True)
            for kernel in (_attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel):
                yield (
                    kernel,
                    dtype,
                    {**common, "BLOCK_M": block_m, "BLOCK_N": block_n},
                    dict(num_warps=warps, num_stages=stages),
                )
            yield _attn_bwd_delta_kernel, dtype, dict(D0=d0, D1=d1, BLOCK_M=block_m), dict(num_warps=4)


def norm_and_rope_configs(hiddens, dtypes):
    for dtype in dtypes:
        for hidden in hiddens:
            block = triton.next_power_of_2(hidden)
            yield _ln_fwd_kernel, dtype, dict(HAS_RESIDUAL=True, BLOCK_H=block), dict(num_warps=_num_warps(block))
            yield _ln_bwd_kernel, dtype, dict(HAS_DSUM=True, BLOCK_H=block), dict(num_warps=_num_warps(block))
        for backward in (False, True):
            yield _rope_kernel, dtype, dict(BACKWARD=backward, BLOCK_T=32, BLOCK_D=128), dict(num_warps=4)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="EVA-g's configurations (hd 88, hidden 1408, bf16) only")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100/H200)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    target = GPUTarget("cuda", args.arch, 32)
    if args.quick:
        configs = [*attention_configs([88], ["bf16"]), *norm_and_rope_configs([1408], ["bf16"])]
    else:
        configs = [
            *attention_configs([64, 88, 96, 128], ["bf16", "fp16", "fp32"]),
            *norm_and_rope_configs([1024, 1408, 8192], ["bf16", "fp16", "fp32"]),
        ]
    for kernel, dtype, constexprs, options in configs:
        print(compile_kernel(kernel, dtype, constexprs, target, **options), flush=True)
    print(f"all {len(configs)} configurations compiled for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
