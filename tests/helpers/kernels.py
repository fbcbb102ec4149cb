"""Helpers for the kernel tests (CPU interpreter and GPU): output poisoning, the accuracy assertion
(the rule itself lives in `eva_kernels.accuracy`, shared with the run-time self-check) and
switching the Triton interpreter on. Imported by the test modules as `kernel_helpers` (pytest puts
tests/ on the import path of the modules it collects from there).
"""

import contextlib
import importlib
import os
from collections.abc import Iterator

import pytest
import torch

from eva_kernels.accuracy import tolerance_problem

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
_KERNEL_MODULES = ("eva_kernels.layer_norm", "eva_kernels.rope", "eva_kernels.attention")


def skip_cpu_on_gpu_host(device: str) -> None:
    if device == "cpu" and torch.cuda.is_available():
        pytest.skip("the interpreter runs only on hosts without CUDA; the cuda variant covers this")


def use_interpreter_if_no_cuda() -> str | None:
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
        return (
            "TRITON_INTERPRET=1 was not set before triton was imported; set it in tests/conftest.py "
            "before any import of triton/timm/eva_kernels, or export TRITON_INTERPRET=1"
        )
    from triton.runtime.interpreter import InterpretedFunction  # only exists/needed on the interpreter path

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


def assert_close_like_torch(
    name: str, ours: torch.Tensor, torch_same_precision: torch.Tensor, ref64: torch.Tensor, atol: float
) -> None:
    """The accuracy rule of `eva_kernels.accuracy`, as a test assertion."""
    problem = tolerance_problem(name, ours, torch_same_precision, ref64, atol)
    assert problem is None, problem


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """torch.empty/empty_like called from Python (the kernels' host code) return NaN-filled
    tensors, so any output element a kernel forgets to write fails the comparison."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-(2**30))

    torch.empty = lambda *a, **kw: poison(real_empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: poison(real_empty_like(*a, **kw))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like
