"""Helpers for the kernel tests (CPU interpreter and GPU) and the GPU check: the tolerance rule,
output poisoning, random inputs, and switching the Triton interpreter on.

Tolerance rule (FlashAttention's tests): against a float64 reference, our max error may be at
most twice the error of PyTorch's own implementation at the same precision, plus a small atol.
"""
import contextlib
import importlib
import os
from typing import Iterator, Optional, Sequence

import pytest
import torch

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
_KERNEL_MODULES = ("eva_kernels.layer_norm", "eva_kernels.rope", "eva_kernels.attention")


def use_interpreter_if_no_cuda() -> Optional[str]:
    """Without a CUDA device, run the Triton kernels in the interpreter. Returns None when the
    kernels can run here, else why not (the `kernels_runnable` fixture fails tests with it).

    `triton.jit` picks compiled vs interpreted when a function is *defined*, Triton's own
    `tl.sum`/`tl.max` included (verified with triton 3.8: setting TRITON_INTERPRET after
    `import triton` fails with "Cannot call @triton.jit'd outside of the scope of a kernel"). So
    the variable must be set before anything imports triton (timm, deepspeed and eva_kernels do):
    tests/conftest.py sets it first; here we check, and re-import our kernel modules if needed.
    """
    if torch.cuda.is_available():
        return None
    if os.environ.get("TRITON_INTERPRET") != "1":
        return ("TRITON_INTERPRET=1 was not set before triton was imported; set it in tests/conftest.py "
                "before any import of triton/timm/eva_kernels, or export TRITON_INTERPRET=1")
    from triton.runtime.interpreter import InterpretedFunction

    for name in _KERNEL_MODULES:
        module = importlib.import_module(name)
        kernels = [v for k, v in vars(module).items() if k.startswith("_") and k.endswith("_kernel")]
        if any(not isinstance(kernel, InterpretedFunction) for kernel in kernels):
            importlib.reload(module)  # same module object: eva_kernels' references stay valid
    return None


@pytest.fixture(autouse=True)
def kernels_runnable():
    """Autouse in the kernel test modules (import it there): fail, with the fix, where the
    kernels cannot run, instead of breaking collection of the whole suite."""
    problem = use_interpreter_if_no_cuda()
    if problem:
        pytest.fail(problem)


def max_error(ours: torch.Tensor, ref64: torch.Tensor) -> float:
    """Max abs difference in float64; NaN (an unwritten, poisoned element) gives inf."""
    diff = (ours.double() - ref64.double()).abs()
    return float("inf") if torch.isnan(diff).any() else diff.max().item()


def assert_close_like_torch(name: str, ours: torch.Tensor, torch_same_precision: torch.Tensor,
                            ref64: torch.Tensor, atol: float) -> None:
    """ours' error vs ref64 <= 2 x torch's own same-precision error + atol."""
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    ours_error, torch_error = max_error(ours, ref64), max_error(torch_same_precision, ref64)
    assert ours_error <= 2 * torch_error + atol, (
        f"{name}: max error {ours_error:.3g} > 2 x torch's {torch_error:.3g} + {atol:g}")


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """torch.empty/empty_like called from Python (the kernels' host code) return NaN-filled
    tensors, so any output element a kernel forgets to write fails the comparison."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-(2 ** 30))

    torch.empty = lambda *a, **kw: poison(real_empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: poison(real_empty_like(*a, **kw))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


def leaf_copies(tensors: Sequence[torch.Tensor], dtype=None):
    """Detached copies that require grad (dtype=torch.float64 for the reference)."""
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def grads_of(outputs, inputs, upstream):
    """Gradients of sum(out * g) over the outputs with respect to the inputs, in float64 math."""
    loss = sum((o.double() * g.double()).sum() for o, g in zip(outputs, upstream))
    return torch.autograd.grad(loss, inputs)
