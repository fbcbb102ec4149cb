"""Flash attention (non-causal) in Triton: forward and FA2-style backward.

Forward: one program per (query block, batch*head); an online softmax over key blocks keeps only
a running max m, sum l and the output accumulator, so no N x N matrix is ever stored. It saves
the log-sum-exp per row (base 2) for the backward.
Backward: delta = rowsum(dO * O) (preprocess kernel); dK/dV kernel over key blocks (loops over
query blocks); dQ kernel over query blocks (loops over key blocks). No atomics.

Head dims that are not a power of two are split into two power-of-two column chunks, e.g. 88 =
64 + 32 (the second masked to 24), 96 = 64 + 32, 80 = 64 + 16; every product is the sum of two
dots over the chunks. That wastes 8 of 96 columns at hd 88 instead of 40 of 128.
Any sequence length works: the tail key block is masked to -inf, the tail query rows are not
stored. Arithmetic is fp32 (statistics, accumulators); on a GPU the dots take bf16/fp16
operands on the tensor cores. In the Triton interpreter (CPU) bf16 dots are wrong, so there
(and for fp32 inputs) operands are upcast and the dots run in exact fp32.
"""

import math

import torch
import triton
import triton.language as tl

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
LOG2E = 1.4426950408889634


def head_dim_chunks(head_dim: int):
    """(first, second) power-of-two column chunks covering head_dim; second is 0 when unused."""
    first = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - first
    return first, (max(16, triton.next_power_of_2(rest)) if rest > 0 else 0)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _load_rows(base, rows, stride_row, n_rows, col0, head_dim, COLS: tl.constexpr):
    """A (len(rows), COLS) tile of one head's (N, head_dim) matrix from column col0; zeros outside."""
    cols = col0 + tl.arange(0, COLS)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < head_dim)
    return tl.load(base + rows[:, None].to(tl.int64) * stride_row + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(base, value, rows, stride_row, n_rows, col0, head_dim, COLS: tl.constexpr):
    cols = col0 + tl.arange(0, COLS)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < head_dim)
    tl.store(base + rows[:, None].to(tl.int64) * stride_row + cols[None, :], value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _head_base(ptr, bh, heads, stride_b, stride_h):
    return ptr + (bh // heads).to(tl.int64) * stride_b + (bh % heads).to(tl.int64) * stride_h


@triton.jit
def _program_bases(q_ptr, k_ptr, v_ptr, heads, n_tokens, head_dim, sqb, sqh, skb, skh, svb, svh):
    """(bh, q, k, v head bases, offset of the head in the contiguous (B*heads, N, hd) tensors)."""
    bh = tl.program_id(1)
    return (
        bh,
        _head_base(q_ptr, bh, heads, sqb, sqh),
        _head_base(k_ptr, bh, heads, skb, skh),
        _head_base(v_ptr, bh, heads, svb, svh),
        bh.to(tl.int64) * n_tokens * head_dim,
    )


@triton.jit
def _attn_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    qk_scale_log2,
    sqb,
    sqh,
    sqn,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    heads,
    n_tokens,
    head_dim,
    D0: tl.constexpr,
    D1: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    bh, q_base, k_base, v_base, head_offset = _program_bases(
        q_ptr, k_ptr, v_ptr, heads, n_tokens, head_dim, sqb, sqh, skb, skh, svb, svh
    )
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q0 = _load_rows(q_base, rows, sqn, n_tokens, 0, head_dim, D0)
    acc0 = tl.zeros((BLOCK_M, D0), dtype=tl.float32)
    if D1 > 0:
        q1 = _load_rows(q_base, rows, sqn, n_tokens, D0, head_dim, D1)
        acc1 = tl.zeros((BLOCK_M, D1), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(0, n_tokens, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        s = _dot(q0, tl.trans(_load_rows(k_base, keys, skn, n_tokens, 0, head_dim, D0)), UPCAST)
        if D1 > 0:
            s += _dot(q1, tl.trans(_load_rows(k_base, keys, skn, n_tokens, D0, head_dim, D1)), UPCAST)
        s = tl.where(keys[None, :] < n_tokens, s * qk_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if not UPCAST:
            p = p.to(v_ptr.dtype.element_ty)  # bf16/fp16 operand for the tensor cores, as FA2
        acc0 = acc0 * alpha[:, None] + _dot(p, _load_rows(v_base, keys, svn, n_tokens, 0, head_dim, D0), UPCAST)
        if D1 > 0:
            acc1 = acc1 * alpha[:, None] + _dot(p, _load_rows(v_base, keys, svn, n_tokens, D0, head_dim, D1), UPCAST)
        m_i = m_new
    o_base = o_ptr + head_offset  # o is contiguous (B, heads, N, hd)
    _store_rows(o_base, acc0 / l_i[:, None], rows, head_dim, n_tokens, 0, head_dim, D0)
    if D1 > 0:
        _store_rows(o_base, acc1 / l_i[:, None], rows, head_dim, n_tokens, D0, head_dim, D1)
    tl.store(lse_ptr + bh.to(tl.int64) * n_tokens + rows, m_i + tl.log2(l_i), mask=rows < n_tokens)


@triton.jit
def _attn_bwd_delta_kernel(
    o_ptr, do_ptr, delta_ptr, n_tokens, head_dim, D0: tl.constexpr, D1: tl.constexpr, BLOCK_M: tl.constexpr
):
    # o and do are contiguous (B*heads, N, hd): delta = rowsum(dO * O) in fp32
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    base = bh.to(tl.int64) * n_tokens * head_dim
    o = _load_rows(o_ptr + base, rows, head_dim, n_tokens, 0, head_dim, D0).to(tl.float32)
    do = _load_rows(do_ptr + base, rows, head_dim, n_tokens, 0, head_dim, D0).to(tl.float32)
    delta = tl.sum(o * do, axis=1)
    if D1 > 0:
        o1 = _load_rows(o_ptr + base, rows, head_dim, n_tokens, D0, head_dim, D1).to(tl.float32)
        do1 = _load_rows(do_ptr + base, rows, head_dim, n_tokens, D0, head_dim, D1).to(tl.float32)
        delta += tl.sum(o1 * do1, axis=1)
    tl.store(delta_ptr + bh.to(tl.int64) * n_tokens + rows, delta, mask=rows < n_tokens)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    dk_ptr,
    dv_ptr,
    lse_ptr,
    delta_ptr,
    qk_scale_log2,
    scale,
    sqb,
    sqh,
    sqn,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    heads,
    n_tokens,
    head_dim,
    D0: tl.constexpr,
    D1: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # one key block: dV = sum_q P^T dO, dK = scale * sum_q dS^T Q, built transposed (keys x queries)
    bh, q_base, k_base, v_base, head_offset = _program_bases(
        q_ptr, k_ptr, v_ptr, heads, n_tokens, head_dim, sqb, sqh, skb, skh, svb, svh
    )  # do, dk, dv: contiguous
    keys = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_offset = bh.to(tl.int64) * n_tokens
    k0 = _load_rows(k_base, keys, skn, n_tokens, 0, head_dim, D0)
    v0 = _load_rows(v_base, keys, svn, n_tokens, 0, head_dim, D0)
    dk0 = tl.zeros((BLOCK_N, D0), dtype=tl.float32)
    dv0 = tl.zeros((BLOCK_N, D0), dtype=tl.float32)
    if D1 > 0:
        k1 = _load_rows(k_base, keys, skn, n_tokens, D0, head_dim, D1)
        v1 = _load_rows(v_base, keys, svn, n_tokens, D0, head_dim, D1)
        dk1 = tl.zeros((BLOCK_N, D1), dtype=tl.float32)
        dv1 = tl.zeros((BLOCK_N, D1), dtype=tl.float32)
    for start_m in range(0, n_tokens, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        in_seq = rows < n_tokens
        q0 = _load_rows(q_base, rows, sqn, n_tokens, 0, head_dim, D0)
        do0 = _load_rows(do_ptr + head_offset, rows, head_dim, n_tokens, 0, head_dim, D0)
        s_t = _dot(k0, tl.trans(q0), UPCAST)
        dp_t = _dot(v0, tl.trans(do0), UPCAST)
        if D1 > 0:
            q1 = _load_rows(q_base, rows, sqn, n_tokens, D0, head_dim, D1)
            do1 = _load_rows(do_ptr + head_offset, rows, head_dim, n_tokens, D0, head_dim, D1)
            s_t += _dot(k1, tl.trans(q1), UPCAST)
            dp_t += _dot(v1, tl.trans(do1), UPCAST)
        lse = tl.load(lse_ptr + row_offset + rows, mask=in_seq, other=0.0)
        delta = tl.load(delta_ptr + row_offset + rows, mask=in_seq, other=0.0)
        p_t = tl.where(in_seq[None, :], tl.exp2(s_t * qk_scale_log2 - lse[None, :]), 0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        if not UPCAST:
            p_t = p_t.to(q_ptr.dtype.element_ty)
            ds_t = ds_t.to(q_ptr.dtype.element_ty)
        dv0 += _dot(p_t, do0, UPCAST)
        dk0 += _dot(ds_t, q0, UPCAST)
        if D1 > 0:
            dv1 += _dot(p_t, do1, UPCAST)
            dk1 += _dot(ds_t, q1, UPCAST)
    _store_rows(dk_ptr + head_offset, dk0 * scale, keys, head_dim, n_tokens, 0, head_dim, D0)
    _store_rows(dv_ptr + head_offset, dv0, keys, head_dim, n_tokens, 0, head_dim, D0)
    if D1 > 0:
        _store_rows(dk_ptr + head_offset, dk1 * scale, keys, head_dim, n_tokens, D0, head_dim, D1)
        _store_rows(dv_ptr + head_offset, dv1, keys, head_dim, n_tokens, D0, head_dim, D1)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    dq_ptr,
    lse_ptr,
    delta_ptr,
    qk_scale_log2,
    scale,
    sqb,
    sqh,
    sqn,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    heads,
    n_tokens,
    head_dim,
    D0: tl.constexpr,
    D1: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # one query block: dQ = scale * sum_k dS K, dS = P * (dO V^T - delta)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh, q_base, k_base, v_base, head_offset = _program_bases(
        q_ptr, k_ptr, v_ptr, heads, n_tokens, head_dim, sqb, sqh, skb, skh, svb, svh
    )
    in_seq = rows < n_tokens
    lse = tl.load(lse_ptr + bh.to(tl.int64) * n_tokens + rows, mask=in_seq, other=0.0)
    delta = tl.load(delta_ptr + bh.to(tl.int64) * n_tokens + rows, mask=in_seq, other=0.0)
    q0 = _load_rows(q_base, rows, sqn, n_tokens, 0, head_dim, D0)
    do0 = _load_rows(do_ptr + head_offset, rows, head_dim, n_tokens, 0, head_dim, D0)
    dq0 = tl.zeros((BLOCK_M, D0), dtype=tl.float32)
    if D1 > 0:
        q1 = _load_rows(q_base, rows, sqn, n_tokens, D0, head_dim, D1)
        do1 = _load_rows(do_ptr + head_offset, rows, head_dim, n_tokens, D0, head_dim, D1)
        dq1 = tl.zeros((BLOCK_M, D1), dtype=tl.float32)
    for start_n in range(0, n_tokens, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        k0 = _load_rows(k_base, keys, skn, n_tokens, 0, head_dim, D0)
        s = _dot(q0, tl.trans(k0), UPCAST)
        dp = _dot(do0, tl.trans(_load_rows(v_base, keys, svn, n_tokens, 0, head_dim, D0)), UPCAST)
        if D1 > 0:
            k1 = _load_rows(k_base, keys, skn, n_tokens, D0, head_dim, D1)
            s += _dot(q1, tl.trans(k1), UPCAST)
            dp += _dot(do1, tl.trans(_load_rows(v_base, keys, svn, n_tokens, D0, head_dim, D1)), UPCAST)
        p = tl.where(keys[None, :] < n_tokens, tl.exp2(s * qk_scale_log2 - lse[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
        if not UPCAST:
            ds = ds.to(k_ptr.dtype.element_ty)
        dq0 += _dot(ds, k0, UPCAST)
        if D1 > 0:
            dq1 += _dot(ds, k1, UPCAST)
    _store_rows(dq_ptr + head_offset, dq0 * scale, rows, head_dim, n_tokens, 0, head_dim, D0)
    if D1 > 0:
        _store_rows(dq_ptr + head_offset, dq1 * scale, rows, head_dim, n_tokens, D0, head_dim, D1)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True when the kernels compute this input exactly as specified (else use the reference)."""
    if q.dim() != 4 or not (q.shape == k.shape == v.shape) or not (q.dtype == k.dtype == v.dtype):
        return False
    head_dim = q.shape[-1]
    if q.dtype not in DTYPES or not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        return False
    return q.numel() > 0 and q.device == k.device == v.device


def _upcast(t: torch.Tensor) -> bool:
    # exact fp32 dots for fp32 inputs, and always in the interpreter (its bf16 dots are wrong)
    return t.dtype == torch.float32 or t.device.type != "cuda"


def launch_config(head_dim: int, n_tokens: int, on_cuda: bool, backward: bool):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a launch (compile_check uses it too)."""
    if not on_cuda:  # interpreter: short tests span several blocks, long ones few
        tile = 32 if n_tokens <= 128 else 64
        return tile, tile, 4, 1
    wide = head_dim > 64
    if backward:
        return 64, 64, (8 if wide else 4), 2
    # 257 tokens: 128-row query blocks compute 384 rows, 64-row blocks 320; take the smaller pad
    block_m = 128 if triton.cdiv(n_tokens, 128) * 128 <= triton.cdiv(n_tokens, 64) * 64 else 64
    return block_m, 64, (8 if wide and block_m == 128 else 4), (2 if wide else 3)


def _last_dim_dense(t: torch.Tensor) -> torch.Tensor:
    # any stride over (B, heads, N) is read in place; the head dim must be unit-stride
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()[:3]]


def attention_fwd(q, k, v, scale: float):
    """-> (o contiguous (B, heads, N, hd), lse fp32 (B*heads, N) base 2)."""
    batch, heads, n_tokens, head_dim = q.shape
    d0, d1 = head_dim_chunks(head_dim)
    block_m, block_n, warps, stages = launch_config(head_dim, n_tokens, q.is_cuda, backward=False)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch * heads, n_tokens, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(n_tokens, block_m), batch * heads)
    _attn_fwd_kernel[grid](
        q,
        k,
        v,
        o,
        lse,
        scale * LOG2E,
        *_strides(q, k, v),
        heads,
        n_tokens,
        head_dim,
        D0=d0,
        D1=d1,
        UPCAST=_upcast(q),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=warps,
        num_stages=stages,
    )
    return o, lse


def attention_bwd(do, q, k, v, o, lse, scale: float):
    """-> (dq, dk, dv), each contiguous (B, heads, N, hd)."""
    batch, heads, n_tokens, head_dim = q.shape
    d0, d1 = head_dim_chunks(head_dim)
    block_m, block_n, warps, stages = launch_config(head_dim, n_tokens, q.is_cuda, backward=True)
    do = do.contiguous()
    delta = torch.empty_like(lse)
    _attn_bwd_delta_kernel[(triton.cdiv(n_tokens, block_m), batch * heads)](
        o, do, delta, n_tokens, head_dim, D0=d0, D1=d1, BLOCK_M=block_m
    )
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    common = dict(D0=d0, D1=d1, UPCAST=_upcast(q), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    args = (scale * LOG2E, scale, *_strides(q, k, v), heads, n_tokens, head_dim)
    _attn_bwd_dkdv_kernel[(triton.cdiv(n_tokens, block_n), batch * heads)](
        q, k, v, do, dk, dv, lse, delta, *args, **common
    )
    _attn_bwd_dq_kernel[(triton.cdiv(n_tokens, block_m), batch * heads)](q, k, v, do, dq, lse, delta, *args, **common)
    return dq, dk, dv


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        q, k, v = _last_dim_dense(q), _last_dim_dense(k), _last_dim_dense(v)
        o, lse = attention_fwd(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = attention_bwd(do, q, k, v, o, lse, ctx.scale)
        return dq, dk, dv, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Triton flash attention on (B, heads, N, head_dim), like SDPA (non-causal, no dropout).
    Callers check `supports(...)` first (`eva_kernels.attention` does)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return AttentionFunction.apply(q, k, v, scale)
