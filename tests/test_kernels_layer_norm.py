"""Triton LayerNorm (+ fused residual) against float64, under the interpreter on CPU (-m gpu: on CUDA)."""

import pytest
import torch
import torch.nn.functional as F

import eva_kernels
from eva_kernels import reference
from eva_kernels.accuracy import ATOL, atol_for, grads_of, leaf_copies
from eva_kernels.layer_norm import layer_norm as triton_layer_norm
from tests.helpers.kernels import (  # noqa: F401 (autouse fixture)
    DEVICES,
    assert_close_like_torch,
    kernels_runnable,
    poisoned_outputs,
    skip_cpu_on_gpu_host,
)


def _run(fn, tensors, eps, upstream):
    x, weight, bias, residual = (list(tensors) + [None])[:4]
    out = fn(x, weight, bias, eps, residual)
    outs = out if isinstance(out, tuple) else (out,)
    return outs, grads_of(outs, tensors, upstream)


def check_layer_norm(rows, hidden, dtype, device, residual, weight_dtype=None, x_view=None, eps=1e-6):
    weight_dtype = weight_dtype or dtype
    x = torch.randn(rows, hidden, dtype=dtype, device=device) if x_view is None else x_view
    tensors = [
        x,
        torch.randn(hidden, dtype=weight_dtype, device=device),
        torch.randn(hidden, dtype=weight_dtype, device=device),
    ]
    if residual:
        tensors.append(torch.randn_like(x) * 3)
    upstream = [torch.randn(x.shape, dtype=dtype, device=device) for _ in range(2 if residual else 1)]

    with poisoned_outputs():
        outs, grads = _run(triton_layer_norm, leaf_copies(tensors), eps, upstream)
    ref_outs, ref_grads = _run(reference.layer_norm, leaf_copies(tensors, torch.float64), eps, upstream)
    torch_outs, torch_grads = _run(reference.layer_norm_same_precision, leaf_copies(tensors), eps, upstream)

    atol = ATOL[dtype]
    for name, o, t, r in zip(("y", "x+residual"), outs, torch_outs, ref_outs):
        assert o.dtype == dtype
        assert_close_like_torch(name, o, t, r, atol)
    for name, g, t, r in zip(("dx", "dweight", "dbias", "dresidual"), grads, torch_grads, ref_grads):
        # dW/dB sum over rows: scale the atol with the row count
        summed_rows = x.numel() // hidden if name in ("dweight", "dbias") else 1
        assert_close_like_torch(name, g, t, r, atol_for(dtype, summed_rows))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "rows, hidden, dtype, residual",
    [
        (3, 1408, torch.float32, False),
        (3, 1408, torch.bfloat16, True),
        (1, 1023, torch.float16, True),
        (5, 1023, torch.bfloat16, False),
        (2, 1024, torch.float16, False),
        (2, 8192, torch.float32, True),
        (7, 40, torch.float32, True),
    ],
)
def test_layer_norm_matches_float64(rows, hidden, dtype, residual, device):
    skip_cpu_on_gpu_host(device)
    torch.manual_seed(rows * hidden)
    check_layer_norm(rows, hidden, dtype, device, residual)


@pytest.mark.parametrize("device", DEVICES)
def test_layer_norm_fp32_weights_with_bf16_input(device):
    skip_cpu_on_gpu_host(device)
    torch.manual_seed(1)
    check_layer_norm(4, 1408, torch.bfloat16, device, residual=True, weight_dtype=torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_layer_norm_non_contiguous_input(device):
    skip_cpu_on_gpu_host(device)
    torch.manual_seed(2)
    x = torch.randn(2, 6, 3, 88, device=device).transpose(1, 2)[:, :, ::2]  # (2, 3, 3, 88) strided
    assert not x.is_contiguous()
    check_layer_norm(None, 88, torch.float32, device, residual=True, x_view=x, eps=1e-5)


def test_dispatch_routes_by_backend(monkeypatch):
    x, w, b = torch.randn(2, 16), torch.randn(16), torch.randn(16)
    monkeypatch.setenv("EVA_KERNELS", "torch")
    assert eva_kernels.layer_norm(x.requires_grad_(), w, b).grad_fn.name() != "LayerNormFunctionBackward"
    monkeypatch.setenv("EVA_KERNELS", "triton")
    if not torch.cuda.is_available():
        assert eva_kernels.layer_norm(x, w, b).grad_fn.name() == "LayerNormFunctionBackward"
        # unsupported input (no weight): reference, still correct
        y = eva_kernels.layer_norm(x, None, None)
        torch.testing.assert_close(y, F.layer_norm(x, (16,), eps=1e-6))
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            eva_kernels.layer_norm(x, w, b)
    monkeypatch.setenv("EVA_KERNELS", "bogus")
    with pytest.raises(ValueError, match="EVA_KERNELS"):
        eva_kernels.layer_norm(x, w, b)


def test_set_backend_overrides_env(monkeypatch):
    monkeypatch.setenv("EVA_KERNELS", "triton")
    eva_kernels.set_backend("torch")
    try:
        assert eva_kernels.backend() == "torch"
        assert eva_kernels.describe()["backend"] == "torch"
    finally:
        eva_kernels.set_backend(None)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        eva_kernels.set_backend("cuda")
