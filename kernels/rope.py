"""EVA-02 2D rotary embedding on q and k in one Triton launch: forward and backward.

Layout (timm `RotaryEmbeddingCat`, see `reference.rope_2d`): for a patch token at table row t,
    out[d] = x[d] * cos[t, d] + rot(x)[d] * sin[t, d],  rot(x)[2i] = -x[2i+1], rot(x)[2i+1] = x[2i]
The pair partner is read with `d ^ 1`, so any even head dim works (88 included, masked to the
next power of two). Tokens before `num_prefix_tokens` (cls) are copied unchanged.
Backward is the transpose: rot^T = -rot, so dx[d] = g[d] cos[d] - rot(g * sin)[d], the same
kernel with the partner's sin and the sign flipped. No gradient flows to the sin/cos tables.
"""

import torch
import triton
import triton.language as tl

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _rotate_tile(
    x_ptr,
    out_ptr,
    sin_ptr,
    cos_ptr,
    sb,
    sh,
    sn,
    heads,
    tokens,
    n_prefix,
    head_dim,
    BACKWARD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One (BLOCK_T tokens x head_dim) tile of one (batch, head) of x; out is contiguous."""
    bh = tl.program_id(0)
    b = bh // heads
    h = bh % heads
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    valid = (t[:, None] < tokens) & (d[None, :] < head_dim)
    src = x_ptr + b.to(tl.int64) * sb + h.to(tl.int64) * sh + t[:, None].to(tl.int64) * sn
    x = tl.load(src + d[None, :], mask=valid, other=0.0).to(tl.float32)
    x_partner = tl.load(src + (d ^ 1)[None, :], mask=valid, other=0.0).to(tl.float32)
    is_patch = (t[:, None] >= n_prefix) & valid
    table_row = (t[:, None] - n_prefix) * head_dim
    cos = tl.load(cos_ptr + table_row + d[None, :], mask=is_patch, other=1.0).to(tl.float32)
    even = (d % 2 == 0)[None, :]
    if BACKWARD:
        sin_partner = tl.load(sin_ptr + table_row + (d ^ 1)[None, :], mask=is_patch, other=0.0).to(tl.float32)
        out = x * cos + tl.where(even, x_partner, -x_partner) * sin_partner
    else:
        sin = tl.load(sin_ptr + table_row + d[None, :], mask=is_patch, other=0.0).to(tl.float32)
        out = x * cos + tl.where(even, -x_partner, x_partner) * sin
    dst = out_ptr + bh.to(tl.int64) * tokens * head_dim + t[:, None] * head_dim + d[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    sin_ptr,
    cos_ptr,
    qsb,
    qsh,
    qsn,
    ksb,
    ksh,
    ksn,
    heads,
    tokens,
    n_prefix,
    head_dim,
    BACKWARD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # q and k share the table loads' addresses: one launch, both tensors per program
    _rotate_tile(
        q_ptr, q_out_ptr, sin_ptr, cos_ptr, qsb, qsh, qsn, heads, tokens, n_prefix, head_dim, BACKWARD, BLOCK_T, BLOCK_D
    )
    _rotate_tile(
        k_ptr, k_out_ptr, sin_ptr, cos_ptr, ksb, ksh, ksn, heads, tokens, n_prefix, head_dim, BACKWARD, BLOCK_T, BLOCK_D
    )


def supports(q: torch.Tensor, k: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, num_prefix_tokens: int) -> bool:
    """True when the kernel computes this input exactly as specified (else use the reference)."""
    if q.dim() != 4 or q.shape != k.shape or q.dtype != k.dtype or q.dtype not in DTYPES:
        return False
    tokens, head_dim = q.shape[-2:]
    table_shape = (tokens - num_prefix_tokens, head_dim)
    if head_dim % 2 or sin.shape != table_shape or cos.shape != table_shape or num_prefix_tokens < 0:
        return False
    if sin.dtype not in DTYPES or cos.dtype not in DTYPES:
        return False
    return q.numel() > 0 and q.device == k.device == sin.device == cos.device


def _last_dim_dense(t: torch.Tensor) -> torch.Tensor:
    # any stride over (B, heads, N) is read in place; the head dim must be unit-stride
    return t if t.stride(-1) == 1 else t.contiguous()


def rope_launch(q, k, sin, cos, num_prefix_tokens: int, backward: bool):
    """Rotate (or, backward, un-rotate) q and k: (B, heads, N, hd) -> two contiguous tensors."""
    q, k = _last_dim_dense(q), _last_dim_dense(k)
    sin, cos = sin.contiguous(), cos.contiguous()
    batch, heads, tokens, head_dim = q.shape
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    block_d = triton.next_power_of_2(head_dim)
    block_t = max(1, min(64, 4096 // block_d, triton.next_power_of_2(tokens)))
    grid = (batch * heads, triton.cdiv(tokens, block_t))
    _rope_kernel[grid](
        q,
        k,
        q_out,
        k_out,
        sin,
        cos,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        heads,
        tokens,
        num_prefix_tokens,
        head_dim,
        BACKWARD=backward,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return q_out, k_out


class Rope2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, sin, cos, num_prefix_tokens):
        ctx.save_for_backward(sin, cos)
        ctx.num_prefix_tokens = num_prefix_tokens
        return rope_launch(q, k, sin, cos, num_prefix_tokens, backward=False)

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        sin, cos = ctx.saved_tensors
        dq_out = dq_out if dq_out is not None else torch.zeros_like(dk_out)
        dk_out = dk_out if dk_out is not None else torch.zeros_like(dq_out)
        dq, dk = rope_launch(dq_out, dk_out, sin, cos, ctx.num_prefix_tokens, backward=True)
        return dq, dk, None, None, None


def rope_2d(
    q: torch.Tensor, k: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, num_prefix_tokens: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton 2D RoPE; same signature and result as `reference.rope_2d`.
    Callers check `supports(...)` first (`eva_kernels.rope_2d` does)."""
    return Rope2dFunction.apply(q, k, sin, cos, num_prefix_tokens)
