"""Fused LayerNorm (optionally with the residual add before it) in Triton: forward and backward.

One program normalizes one row held whole in registers (hidden <= 8192), statistics in fp32.
With a residual the kernel also writes `x + residual` (rounded to the input dtype, exactly what
the unfused block keeps as its residual stream), and normalizes that rounded sum, so the fused
and unfused paths compute the same function.
Backward recomputes x_hat from the saved sum, mean and rstd; dW/dB are reduced in fp32: each
program sums its rows into one fp32 partial row, and the partials are summed on the host
(no atomics, so results do not depend on scheduling).
"""

import torch
import triton
import triton.language as tl

MAX_HIDDEN = 8192
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _ln_fwd_kernel(
    x_ptr,
    res_ptr,
    sum_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    mean_ptr,
    rstd_ptr,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    in_row = cols < hidden
    x = tl.load(x_ptr + row * hidden + cols, mask=in_row, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(res_ptr + row * hidden + cols, mask=in_row, other=0.0).to(tl.float32)
        summed = x.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * hidden + cols, summed, mask=in_row)
        x = summed.to(tl.float32)  # normalize what the residual stream keeps
    mean = tl.sum(x, axis=0) / hidden
    centered = tl.where(in_row, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / hidden + eps)
    w = tl.load(w_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    y = centered * rstd * w + b
    tl.store(y_ptr + row * hidden + cols, y.to(y_ptr.dtype.element_ty), mask=in_row)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _ln_bwd_kernel(
    x_ptr,
    w_ptr,
    mean_ptr,
    rstd_ptr,
    dy_ptr,
    dsum_ptr,
    dx_ptr,
    dw_part_ptr,
    db_part_ptr,
    rows,
    hidden,
    rows_per_program,
    HAS_DSUM: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    in_row = cols < hidden
    w = tl.load(w_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    first_row = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = first_row + i
        if row < rows:
            offs = row.to(tl.int64) * hidden + cols
            x = tl.load(x_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
            x_hat = tl.where(in_row, (x - tl.load(mean_ptr + row)) * tl.load(rstd_ptr + row), 0.0)
            wdy = w * dy
            # dx = rstd * (w*dy - mean(w*dy) - x_hat * mean(w*dy*x_hat))
            c1 = tl.sum(x_hat * wdy, axis=0) / hidden
            c2 = tl.sum(wdy, axis=0) / hidden
            dx = (wdy - (x_hat * c1 + c2)) * tl.load(rstd_ptr + row)
            if HAS_DSUM:  # gradient reaching the sum output directly (the residual stream)
                dx += tl.load(dsum_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=in_row)
            dw_acc += dy * x_hat
            db_acc += dy
    tl.store(dw_part_ptr + pid * hidden + cols, dw_acc, mask=in_row)
    tl.store(db_part_ptr + pid * hidden + cols, db_acc, mask=in_row)


def supports(x: torch.Tensor, weight, bias, residual=None) -> bool:
    """True when the kernel computes this input exactly as specified (else use the reference)."""
    if weight is None or bias is None or x.dtype not in DTYPES or x.shape[-1] > MAX_HIDDEN:
        return False
    if weight.dtype not in DTYPES or bias.dtype not in DTYPES or weight.shape != x.shape[-1:]:
        return False
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        return False
    return x.numel() > 0 and x.device == weight.device == bias.device


def _num_warps(block_h: int) -> int:
    return min(16, max(1, block_h // 256))


def layer_norm_fwd(x2d: torch.Tensor, res2d: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """x2d, res2d: (rows, hidden) contiguous -> (y, summed or None, mean, rstd)."""
    rows, hidden = x2d.shape
    block_h = triton.next_power_of_2(hidden)
    y = torch.empty_like(x2d)
    summed = torch.empty_like(x2d) if res2d is not None else None
    mean = torch.empty(rows, dtype=torch.float32, device=x2d.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x2d.device)
    _ln_fwd_kernel[(rows,)](
        x2d,
        res2d if res2d is not None else x2d,
        summed if summed is not None else y,
        y,
        weight,
        bias,
        mean,
        rstd,
        hidden,
        eps,
        HAS_RESIDUAL=res2d is not None,
        BLOCK_H=block_h,
        num_warps=_num_warps(block_h),
    )
    return y, summed, mean, rstd


def _num_programs(rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        return min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(rows, 4)  # interpreter: few programs, each a vectorized numpy loop over rows


def layer_norm_bwd(dy2d, dsum2d, x_norm_in, weight, mean, rstd):
    """Gradients of the rows; x_norm_in is the tensor that was normalized (x or x + residual)."""
    rows, hidden = x_norm_in.shape
    block_h = triton.next_power_of_2(hidden)
    programs = _num_programs(rows, x_norm_in.device)
    rows_per_program = triton.cdiv(rows, programs)
    dx = torch.empty_like(x_norm_in)
    dw_part = torch.empty(programs, hidden, dtype=torch.float32, device=x_norm_in.device)
    db_part = torch.empty(programs, hidden, dtype=torch.float32, device=x_norm_in.device)
    _ln_bwd_kernel[(programs,)](
        x_norm_in,
        weight,
        mean,
        rstd,
        dy2d,
        dsum2d if dsum2d is not None else dy2d,
        dx,
        dw_part,
        db_part,
        rows,
        hidden,
        rows_per_program,
        HAS_DSUM=dsum2d is not None,
        BLOCK_H=block_h,
        num_warps=_num_warps(block_h),
    )
    return dx, dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype)


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, residual):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1]).contiguous()
        res2d = residual.reshape(-1, shape[-1]).contiguous() if residual is not None else None
        y, summed, mean, rstd = layer_norm_fwd(x2d, res2d, weight.contiguous(), bias.contiguous(), eps)
        ctx.save_for_backward(summed if summed is not None else x2d, weight, mean, rstd)
        ctx.has_residual = residual is not None
        if residual is None:
            return y.view(shape)
        return y.view(shape), summed.view(shape)

    @staticmethod
    def backward(ctx, dy, dsum=None):
        normalized_in, weight, mean, rstd = ctx.saved_tensors
        hidden = normalized_in.shape[-1]
        dy2d = dy.reshape(-1, hidden).contiguous()
        dsum2d = dsum.reshape(-1, hidden).contiguous() if dsum is not None else None
        dx, dw, db = layer_norm_bwd(dy2d, dsum2d, normalized_in, weight.contiguous(), mean, rstd)
        dx = dx.view(dy.shape)
        return dx, dw, db, None, (dx if ctx.has_residual else None)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
):
    """Triton LayerNorm over the last dim; with `residual`: `(norm(x + residual), x + residual)`.
    Callers check `supports(...)` first (`eva_kernels.layer_norm` does)."""
    return LayerNormFunction.apply(x, weight, bias, eps, residual)
