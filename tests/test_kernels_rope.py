"""Triton 2D RoPE against float64 and timm's EVA-02 layout, under the interpreter on CPU (-m gpu: on CUDA)."""

import pytest
import torch
from timm.layers import RotaryEmbeddingCat, apply_rot_embed_cat

import eva_kernels
from eva_kernels import reference
from eva_kernels.accuracy import ATOL, grads_of, leaf_copies
from eva_kernels.rope import rope_2d as triton_rope_2d
from tests.helpers.kernels import (  # noqa: F401 (autouse fixture)
    DEVICES,
    assert_close_like_torch,
    kernels_runnable,
    poisoned_outputs,
    skip_cpu_on_gpu_host,
)


def timm_tables(grid, head_dim, device):
    """sin, cos (grid_h * grid_w, head_dim) exactly as timm's EVA-02 builds them."""
    emb = RotaryEmbeddingCat(head_dim, in_pixels=False, feat_shape=list(grid)).get_embed()
    sin, cos = emb.chunk(2, dim=-1)
    return sin.to(device), cos.to(device)


def qk_from_fused_qkv(batch, heads, tokens, head_dim, dtype, device):
    # the model's q and k: strided views of one (B, N, 3, heads, hd) projection
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, dtype=dtype, device=device)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "batch, heads, grid, head_dim, dtype, num_prefix_tokens",
    [
        (1, 2, (7, 9), 88, torch.bfloat16, 1),
        (3, 1, (7, 9), 64, torch.float16, 1),
        (1, 1, (7, 9), 88, torch.float32, 0),
        (3, 2, (2, 3), 32, torch.bfloat16, 2),
    ],
)
def test_rope_matches_float64(batch, heads, grid, head_dim, dtype, num_prefix_tokens, device):
    skip_cpu_on_gpu_host(device)
    torch.manual_seed(head_dim + batch)
    tokens = grid[0] * grid[1] + num_prefix_tokens
    q, k = qk_from_fused_qkv(batch, heads, tokens, head_dim, dtype, device)
    assert not q.is_contiguous()
    sin, cos = timm_tables(grid, head_dim, device)
    upstream = [torch.randn(q.shape, dtype=dtype, device=device) for _ in range(2)]

    def run(fn, tensors):
        outs = fn(*tensors, sin, cos, num_prefix_tokens)
        return outs, grads_of(outs, tensors, upstream)

    with poisoned_outputs():
        outs, grads = run(triton_rope_2d, leaf_copies([q, k]))
    ref_outs, ref_grads = run(reference.rope_2d, leaf_copies([q, k], torch.float64))
    torch_outs, torch_grads = run(reference.rope_2d_same_precision, leaf_copies([q, k]))
    for name, o, t, r in zip(("q", "k", "dq", "dk"), outs + grads, torch_outs + torch_grads, ref_outs + ref_grads):
        assert o.dtype == dtype
        assert_close_like_torch(name, o, t, r, ATOL[dtype])
    # cls (prefix) tokens pass through bit-exact
    torch.testing.assert_close(outs[0][..., :num_prefix_tokens, :], q[..., :num_prefix_tokens, :], rtol=0, atol=0)


def test_layout_is_timm_eva02():
    """The reference (and so the kernel) rotates patch tokens exactly like timm's EVA-02."""
    torch.manual_seed(0)
    grid, head_dim = (7, 9), 88
    q, k = qk_from_fused_qkv(2, 2, 64, head_dim, torch.float32, "cpu")
    sin, cos = timm_tables(grid, head_dim, "cpu")
    expected = apply_rot_embed_cat(q[..., 1:, :], torch.cat([sin, cos], -1))
    ours_ref, _ = reference.rope_2d(q, k, sin, cos, 1)
    torch.testing.assert_close(ours_ref[..., 1:, :], expected)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter
    ours_triton, _ = triton_rope_2d(q.to(device), k.to(device), sin.to(device), cos.to(device), 1)
    torch.testing.assert_close(ours_triton[..., 1:, :].cpu(), expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors through Triton need the interpreter")
def test_dispatch_routes_unsupported_to_reference(monkeypatch):
    monkeypatch.setenv("EVA_KERNELS", "triton")
    q, k = torch.randn(1, 1, 5, 6, dtype=torch.float64), torch.randn(1, 1, 5, 6, dtype=torch.float64)
    sin, cos = torch.randn(4, 6), torch.randn(4, 6)
    out_q, _ = eva_kernels.rope_2d(q, k, sin, cos, 1)  # float64: not a kernel dtype
    torch.testing.assert_close(out_q, reference.rope_2d(q, k, sin, cos, 1)[0])
    bad_sin = torch.randn(3, 6)  # table rows do not match the patch tokens: reference raises
    with pytest.raises(RuntimeError):
        eva_kernels.rope_2d(q.float(), k.float(), bad_sin, bad_sin, 1)
    q32 = q.float().requires_grad_()
    assert eva_kernels.rope_2d(q32, k.float(), sin, cos, 1)[0].grad_fn.name() == "Rope2dFunctionBackward"
