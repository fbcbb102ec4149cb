"""Plain-PyTorch references for the fused kernels.

They are the CPU fallback, the ground truth of the kernel tests and self-check (fed float64
inputs they compute in float64) and a benchmark provider. Statistics and softmax run in at least
fp32 whatever the input dtype, like the kernels. The `*_same_precision` versions compute in the
input dtype as eager PyTorch does: their error is the yardstick of the accuracy rule
(`eva_kernels.accuracy`).
"""

import torch
import torch.nn.functional as F


def _wide(t: torch.Tensor) -> torch.Tensor:
    # fp32 arithmetic for low-precision inputs; float64 stays float64 (the ground truth)
    return t if t.dtype == torch.float64 else t.float()


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim; with `residual`, normalizes x + residual and returns
    `(normalized, x + residual)` (the pre-LN block's fused "add then norm")."""
    summed = x if residual is None else x + residual
    wide = _wide(summed)
    y = F.layer_norm(
        wide,
        wide.shape[-1:],
        None if weight is None else weight.to(wide.dtype),
        None if bias is None else bias.to(wide.dtype),
        eps,
    ).to(x.dtype)
    return y if residual is None else (y, summed)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    # (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): timm/EVA-02 interleaved layout
    return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    prefix, patches = x[..., :num_prefix_tokens, :], x[..., num_prefix_tokens:, :]
    wide = _wide(patches)
    rotated = wide * cos.to(wide.dtype) + rotate_pairs(wide) * sin.to(wide.dtype)
    return torch.cat([prefix, rotated.to(x.dtype)], dim=-2)


def rope_2d(
    q: torch.Tensor,
    k: torch.Tensor,
    sin: torch.Tensor,
    cos: torch.Tensor,
    num_prefix_tokens: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA-02 2D rotary embedding on q and k.

    q, k: (B, heads, N, head_dim); sin, cos: (N - num_prefix_tokens, head_dim), the timm
    `RotaryEmbeddingCat` tables (pairwise interleaved; first half of the frequencies over
    rows, second half over columns). The first `num_prefix_tokens` tokens (cls) pass
    through unchanged.
    """
    return apply_rope(q, sin, cos, num_prefix_tokens), apply_rope(k, sin, cos, num_prefix_tokens)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Non-causal softmax attention; q, k, v: (B, heads, N, head_dim) -> (B, heads, N, head_dim)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(_wide(q), _wide(k).transpose(-2, -1)) * scale
    return torch.matmul(scores.softmax(dim=-1), _wide(v)).to(q.dtype)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """PyTorch's fused SDPA: the fast torch path used by the model when Triton is off."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def layer_norm_same_precision(x, weight, bias, eps: float = 1e-6, residual=None):
    """`layer_norm` as eager PyTorch computes it in x's dtype (weights cast to it)."""
    summed = x if residual is None else x + residual
    y = F.layer_norm(summed, summed.shape[-1:], weight.to(x.dtype), bias.to(x.dtype), eps)
    return y if residual is None else (y, summed)


def rope_2d_same_precision(q, k, sin, cos, num_prefix_tokens: int = 1):
    """`rope_2d` with every product in q's dtype (tables cast to it)."""

    def rotate(x):
        patches = x[..., num_prefix_tokens:, :]
        s, c = sin.to(x.dtype), cos.to(x.dtype)
        return torch.cat([x[..., :num_prefix_tokens, :], patches * c + rotate_pairs(patches) * s], -2)

    return rotate(q), rotate(k)


def attention_same_precision(q, k, v, scale: float | None = None):
    """Eager softmax attention in q's dtype (FlashAttention's tests' `upcast=False` reference)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1) @ v
