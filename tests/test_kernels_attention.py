"""Triton flash attention against float64, under the interpreter on CPU (-m gpu: on CUDA)."""

import pytest
import torch
import torch.nn.functional as F

import eva_kernels
from eva_kernels import reference
from eva_kernels.accuracy import ATOL, grads_of, leaf_copies
from eva_kernels.attention import attention as triton_attention
from eva_kernels.attention import head_dim_chunks
from tests.helpers.kernels import (  # noqa: F401 (autouse fixture)
    DEVICES,
    assert_close_like_torch,
    kernels_runnable,
    poisoned_outputs,
    skip_cpu_on_gpu_host,
)


def check_attention(q, k, v, scale=None):
    dtype = q.dtype
    upstream = [torch.randn(q.shape, dtype=dtype, device=q.device)]

    def run(fn, tensors):
        out = fn(*tensors, scale)
        return [out], grads_of([out], tensors, upstream)

    with poisoned_outputs():
        outs, grads = run(triton_attention, leaf_copies([q, k, v]))
    ref_outs, ref_grads = run(reference.attention, leaf_copies([q, k, v], torch.float64))
    torch_outs, torch_grads = run(reference.attention_same_precision, leaf_copies([q, k, v]))
    for name, o, t, r in zip(
        ("o", "dq", "dk", "dv"), outs + list(grads), torch_outs + list(torch_grads), ref_outs + list(ref_grads)
    ):
        assert o.dtype == dtype and o.shape == q.shape
        assert_close_like_torch(name, o, t, r, ATOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "batch, heads, tokens, head_dim, dtype",
    [
        (1, 1, 257, 88, torch.bfloat16),  # EVA-g: 256 patches + cls, masked tail, split head dim
        (3, 1, 70, 88, torch.float16),
        (1, 2, 45, 64, torch.float32),
        (1, 1, 33, 96, torch.bfloat16),
        (2, 1, 40, 128, torch.float16),
        (1, 1, 1, 64, torch.float32),  # a single token
    ],
)
def test_attention_matches_float64(batch, heads, tokens, head_dim, dtype, device):
    skip_cpu_on_gpu_host(device)
    torch.manual_seed(tokens * head_dim)
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, dtype=dtype, device=device) for _ in range(3))
    check_attention(q, k, v)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_strided_inputs_and_scale(device):
    skip_cpu_on_gpu_host(device)
    torch.manual_seed(3)
    qkv = torch.randn(2, 50, 3, 2, 88, dtype=torch.bfloat16, device=device)  # the model's fused qkv
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    check_attention(q, k, v, scale=0.3)
    check_attention(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v)  # head dim not unit-stride


def test_head_dim_split_wastes_little():
    assert head_dim_chunks(88) == (64, 32)
    assert head_dim_chunks(96) == (64, 32)
    assert head_dim_chunks(80) == (64, 16)
    assert head_dim_chunks(64) == (64, 0)
    assert head_dim_chunks(128) == (128, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors through Triton need the interpreter")
def test_dispatch_routes_unsupported_to_reference(monkeypatch):
    monkeypatch.setenv("EVA_KERNELS", "triton")
    q = torch.randn(1, 2, 9, 8, requires_grad=True)  # head dim 8: below the kernel's minimum
    out = eva_kernels.attention(q, q, q)
    assert out.grad_fn.name() != "AttentionFunctionBackward"
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q))
    q16 = torch.randn(1, 2, 9, 16, requires_grad=True)
    assert eva_kernels.attention(q16, q16, q16).grad_fn.name() == "AttentionFunctionBackward"
    monkeypatch.setenv("EVA_KERNELS", "torch")
    assert eva_kernels.attention(q16, q16, q16).grad_fn.name() != "AttentionFunctionBackward"
