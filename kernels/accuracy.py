"""The one accuracy rule for our kernels: the interpreter/GPU tests and the run-time self-check
(`eva_kernels.selfcheck`) both judge a kernel with it.

Rule (FlashAttention's tests): against a float64 reference, our max abs error may be at most
twice the error of PyTorch's own eager implementation at the same precision, plus a small
per-dtype atol (it covers inputs where PyTorch happens to be exact). A gradient that sums over
rows (LayerNorm's dW, dB) gets the atol times the row count.
"""

from collections.abc import Callable, Sequence

import torch

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def atol_for(dtype: torch.dtype, summed_rows: int = 1) -> float:
    """The rule's atol for an output of `dtype` that sums `summed_rows` rows (1: no sum)."""
    return ATOL[dtype] * summed_rows


def max_error(ours: torch.Tensor, ref64: torch.Tensor) -> float:
    """Max abs difference in float64; NaN (an unwritten or poisoned element) gives inf."""
    diff = (ours.double() - ref64.double()).abs()
    return float("inf") if torch.isnan(diff).any() else diff.max().item()


def tolerance_problem(
    name: str, ours: torch.Tensor, torch_same_precision: torch.Tensor, ref64: torch.Tensor, atol: float
) -> str | None:
    """None when ours' error vs ref64 <= 2 x torch's own same-precision error + atol, else why not."""
    if ours.shape != ref64.shape:
        return f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    ours_error, torch_error = max_error(ours, ref64), max_error(torch_same_precision, ref64)
    if ours_error <= 2 * torch_error + atol:
        return None
    return f"{name}: max error {ours_error:.3g} > 2 x torch's {torch_error:.3g} + {atol:g}"


def leaf_copies(tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Detached copies that require grad (dtype=torch.float64 for the reference)."""
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def as_tuple(result) -> tuple:
    return result if isinstance(result, tuple) else (result,)


def grads_of(
    outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], upstream: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """Gradients of sum(out * g) over the outputs with respect to the inputs, in float64 math."""
    loss = sum((o.double() * g.double()).sum() for o, g in zip(outputs, upstream))
    return torch.autograd.grad(loss, inputs)


def outputs_and_grads(
    fn: Callable,
    grad_inputs: Sequence[torch.Tensor],
    constants: Sequence[torch.Tensor],
    upstream: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """fn(*grad_inputs, *constants)'s outputs followed by the gradients of its grad_inputs."""
    outputs = as_tuple(fn(*grad_inputs, *constants))
    return list(outputs) + list(grads_of(outputs, grad_inputs, upstream))
