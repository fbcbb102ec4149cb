"""eva_kernels: LayerNorm, 2D RoPE and attention for EVA, with one switch between
implementations.

Backend choice, in order: `set_backend(name)` (the training config calls it), else the env
variable `EVA_KERNELS`, else "auto".
- "auto":   on CUDA, each Triton kernel where it passed its self-check and beat the PyTorch path
            (`selfcheck`: per op, dtype and shape class, forward and backward); PyTorch elsewhere.
- "triton": Triton kernels always, still self-checked on CUDA: a wrong one raises (on CPU tensors
            this needs `TRITON_INTERPRET=1`, and is not self-checked unless `autotune` is asked).
- "torch":  PyTorch always (SDPA for attention).
- "apex":   like "auto", but LayerNorm through NVIDIA apex's FusedLayerNorm when importable.
Inputs a kernel does not support are routed to the reference, never computed wrong.

Start-up: the model build calls `autotune(vit_shapes(...))` once on every rank, so every rank
decides the same (one collective); `decisions()` then says what was chosen and why (JSON-able,
for the run record) and `describe()` what the switch resolves to.

The public functions share names with their submodules (`layer_norm`, `attention`), so reach a
submodule's internals with `from eva_kernels.attention import AttentionFunction`, not
`import eva_kernels.attention as m` (that binds the public function).
"""

import functools
import os
from collections.abc import Iterable

from . import reference, selfcheck
from .selfcheck import KernelShape, set_test_hook, vit_shapes  # noqa: F401 (public API)

try:  # the submodules are bound here, before the public functions below take their names
    from . import attention as _triton_attention
    from . import layer_norm as _triton_layer_norm
    from . import rope as _triton_rope

    TRITON_IMPORT_ERROR: str | None = None
except ImportError as error:  # no Triton on this platform: the references serve every backend but "triton"
    _triton_attention = _triton_layer_norm = _triton_rope = None
    TRITON_IMPORT_ERROR = f"{type(error).__name__}: {error}"

BACKENDS = ("auto", "triton", "torch", "apex")
_backend_override: str | None = None


def set_backend(name: str | None) -> None:
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


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_mode(*tensors) -> str | None:
    """'auto' or 'triton' when this call may go to Triton (the self-check then decides), None when
    it goes to PyTorch; "triton" on CPU tensors without the interpreter is an error."""
    name = backend()
    if name == "torch":
        return None
    if name == "triton":
        if TRITON_IMPORT_ERROR is not None:
            raise RuntimeError(
                f"EVA_KERNELS=triton but Triton does not import ({TRITON_IMPORT_ERROR}); use auto or torch"
            )
        if not all(t.is_cuda for t in tensors if t is not None) and not _interpreting():
            raise RuntimeError("EVA_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1; use auto or torch on CPU")
        return "triton"
    return None if TRITON_IMPORT_ERROR is not None else "auto"


def autotune(shapes: Iterable[KernelShape], warmup: int | None = None, reps: int | None = None) -> dict:
    """Self-check every shape class in `shapes` under the current backend, on every rank at once
    (one collective under torch.distributed; call it with the same shapes on every rank, e.g.
    `autotune(vit_shapes(micro_batch, tokens, width, heads, torch.bfloat16, rope=...))` from the
    model build). Returns `decisions()`. Raises under backend "triton" where a kernel is wrong."""
    selfcheck.autotune(shapes, _check_mode(), warmup, reps)
    return decisions()


def decisions() -> dict:
    """What the self-check chose per shape class, and why (JSON-able: the run record stores it)."""
    return {"backend": backend(), "kernels": selfcheck.decisions(_check_mode())}


def _check_mode() -> str:
    return "auto" if backend() == "apex" else backend()  # apex swaps LayerNorm only: checked like auto


@functools.cache
def apex_layer_norm():
    """NVIDIA apex's fused LayerNorm function, or None when apex (NVIDIA's: `apex.normalization`) is absent."""
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine
    except ImportError:
        return None
    return fused_layer_norm_affine


def describe() -> dict:
    """What the switch resolves to in this process, for the resolved config and benchmark logs."""
    triton_version = None
    if TRITON_IMPORT_ERROR is None:
        import triton

        triton_version = triton.__version__
    return {
        "backend": backend(),
        "triton": triton_version,
        "interpreter": _interpreting(),
        "apex_layer_norm": apex_layer_norm() is not None,
    }


def layer_norm(x, weight, bias, eps: float = 1e-6, residual=None):
    """LayerNorm over the last dim. With `residual`: returns `(norm(x + residual), x + residual)`."""
    if (
        backend() == "apex"
        and x.is_cuda
        and apex_layer_norm() is not None
        and weight is not None
        and bias is not None
        and weight.dtype == x.dtype
    ):
        summed = x if residual is None else x + residual
        y = apex_layer_norm()(summed, weight, bias, summed.shape[-1:], eps)
        return y if residual is None else (y, summed)
    mode = _triton_mode(x, weight, bias, residual)
    if (
        mode
        and _triton_layer_norm.supports(x, weight, bias, residual)
        and selfcheck.use_triton(selfcheck.layer_norm_shape(x, residual), mode)
    ):
        return _triton_layer_norm.layer_norm(x, weight, bias, eps, residual)
    return reference.layer_norm(x, weight, bias, eps, residual)


def rope_2d(q, k, sin, cos, num_prefix_tokens: int = 1):
    """EVA-02 2D RoPE on q and k (B, heads, N, head_dim) in one launch; returns (q_rot, k_rot).

    sin, cos: (N - num_prefix_tokens, head_dim) timm `RotaryEmbeddingCat` tables (pairwise
    interleaved; first half of the frequencies over rows, second half over columns); the first
    `num_prefix_tokens` tokens (cls) pass through unchanged; no gradient flows to sin/cos.
    See `reference.rope_2d`.
    """
    mode = _triton_mode(q, k, sin, cos)
    if (
        mode
        and _triton_rope.supports(q, k, sin, cos, num_prefix_tokens)
        and selfcheck.use_triton(selfcheck.rope_shape(q, sin), mode)
    ):
        return _triton_rope.rope_2d(q, k, sin, cos, num_prefix_tokens)
    return reference.rope_2d(q, k, sin, cos, num_prefix_tokens)


def attention(q, k, v, scale: float | None = None):
    """Non-causal attention on (B, heads, N, head_dim) tensors, like SDPA; `scale` defaults to hd**-0.5."""
    mode = _triton_mode(q, k, v)
    if mode and _triton_attention.supports(q, k, v) and selfcheck.use_triton(selfcheck.attention_shape(q), mode):
        return _triton_attention.attention(q, k, v, scale)
    return reference.sdpa_attention(q, k, v, scale)
