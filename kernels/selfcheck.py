"""Self-verifying kernels: before a process trains on our Triton kernels, each one proves itself
on the device it will run on, against the PyTorch reference, and races the PyTorch path.

Per (op, dtype, shape class, device) the check runs our kernel's forward and backward on random
inputs and judges the outputs and every gradient by `eva_kernels.accuracy`'s rule (the kernel
tests' rule), then times forward+backward of ours and of the PyTorch path (SDPA for attention):
median of N after warm-up, CUDA events on a GPU. Backend "auto" uses ours only where it passed
and was faster; "triton" uses ours wherever it passed and raises where it did not; "torch" checks
nothing. The PyTorch path is judged by the same rule; where it fails (cuDNN SDPA at 257 tokens
before cuDNN 9.15.1) and ours passes, ours is used whatever the timing.

Shape class: what selects a kernel's code path and launch configuration, so that one check
stands for every call in the class: head dim (exact: it picks the column split) and token count
rounded up to a power of two (attention, RoPE); hidden size rounded up to a power of two
(LayerNorm: its row block). Batch is not in the class: the check times at the shape it is given
(the micro batch) and judges accuracy on at most ACCURACY_SAMPLES samples (float64 is slow).
Inputs come from a seeded generator of their own: the check never moves the process's RNG.

Agreement across ranks. Ranks must take the same path (a kernel wrong on one card is wrong for
the run, and mixed paths mix numerics within one data-parallel step), yet a collective inside
`forward` deadlocks as soon as ranks see different shape classes. So the decision is made up
front: the model build calls `eva_kernels.autotune(shapes)` once on every rank with the calls the
model will make; each rank checks locally (a check that raises is a failed check, never an early
exit), then exactly one all-reduce (MIN) of a fixed-size int64 vector merges the "use ours"
flags. The vector also carries a fingerprint of (backend, shape list) and its negation, so that
ranks which asked different questions all raise instead of mixing answers; its size is fixed
(MAX_SHAPES) so the collective matches even then.
Calls of a class nobody autotuned: in one process, "auto" and "triton" check on first use (no
collective needed); under torch.distributed, "auto" takes the PyTorch path and warns once (per
rank checks could disagree), "triton" checks locally and raises where ours is wrong. Tensors not
on CUDA are never checked lazily (the CPU interpreter is for tests; they call `autotune`).

Test hook: `set_test_hook(fn)` wraps each implementation a check builds, `fn(op, provider, impl)
-> impl` with provider "triton" or "torch"; the tests inject wrong and slow kernels with it.
"""

import dataclasses
import importlib
import json
import logging
import statistics
import time
import zlib
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from . import reference
from .accuracy import as_tuple, atol_for, leaf_copies, outputs_and_grads, tolerance_problem

OPS = ("layer_norm", "add_layer_norm", "rope_2d", "attention")
MAX_SHAPES = 32  # entries of the one all-reduce: its size must not depend on the caller
ACCURACY_SAMPLES = 2  # attention, RoPE: samples judged in float64 (it is slow); LayerNorm: rows
ACCURACY_ROWS = 512
LAYER_NORM_EPS = 1e-6  # the model's (EVA: 1e-6)
_log = logging.getLogger("eva_kernels")


@dataclasses.dataclass(frozen=True)
class KernelShape:
    """One kind of call the model makes: op, the concrete shape to check and time, dtype, device."""

    op: str
    shape: tuple[int, ...]  # layer norms: (rows, hidden); rope_2d, attention: (batch, heads, tokens, head_dim)
    dtype: torch.dtype = torch.bfloat16
    device: str = "cuda"  # a device type: the check runs on this process's current device of it
    prefix_tokens: int = 1  # rope_2d: leading tokens without a table row (cls)

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"unknown kernel op {self.op!r}; choose one of {', '.join(OPS)}")
        if len(self.shape) != (2 if "layer_norm" in self.op else 4):
            raise ValueError(
                f"{self.op} shape {self.shape}: expected (rows, hidden) or (batch, heads, tokens, head_dim)"
            )

    def shape_class(self) -> str:
        pow2 = lambda n: 1 << max(0, n - 1).bit_length()  # noqa: E731
        if "layer_norm" in self.op:
            return f"hidden<={pow2(self.shape[1])}"
        return f"hd{self.shape[3]}-tokens<={pow2(self.shape[2])}"

    def key(self) -> str:
        return f"{self.op}/{str(self.dtype).replace('torch.', '')}/{self.shape_class()}/{self.device}"


@dataclasses.dataclass
class Decision:
    key: str
    checked_shape: list[int]
    status: str  # passed | failed | unsupported | not checked
    use: str  # triton | torch
    reason: str
    triton_ms: float | None = None  # forward + backward, median
    torch_ms: float | None = None
    problems: list[str] = dataclasses.field(default_factory=list)


def vit_shapes(
    batch: int,
    tokens: int,
    width: int,
    heads: int,
    dtype: torch.dtype = torch.bfloat16,
    rope: bool = False,
    prefix_tokens: int = 1,
    device: str = "cuda",
    extra_norm_widths: Sequence[int] = (),
) -> list[KernelShape]:
    """The kernel calls of a pre-LN ViT block stack (plus LayerNorms of other widths, e.g. SwiGLU's)."""
    rows, head_dim = batch * tokens, width // heads
    shapes = [
        KernelShape("layer_norm", (rows, width), dtype, device),
        KernelShape("add_layer_norm", (rows, width), dtype, device),
        KernelShape("attention", (batch, heads, tokens, head_dim), dtype, device),
    ]
    if rope:
        shapes.append(KernelShape("rope_2d", (batch, heads, tokens, head_dim), dtype, device, prefix_tokens))
    return shapes + [KernelShape("layer_norm", (rows, w), dtype, device) for w in extra_norm_widths]


class _State:
    """This process's decisions, keyed by (backend, shape key); the test hook; how many checks ran."""

    def __init__(self):
        self.decisions: dict[tuple[str, str], Decision] = {}
        self.hook: Callable | None = None
        self.checks_run = 0


_STATE = _State()


def set_test_hook(hook: Callable | None) -> None:
    """Tests only: `hook(op, provider, impl) -> impl` wraps what the checks run; None removes it."""
    _STATE.hook = hook


def reset() -> None:
    """Forget every decision (tests; a process that changes GPUs)."""
    _STATE.decisions.clear()
    _STATE.checks_run = 0


def checks_run() -> int:
    """How many shape classes this process has checked (each at most once per backend)."""
    return _STATE.checks_run


def decisions(mode: str) -> dict[str, dict]:
    """The decisions made under backend `mode`, JSON-able, keyed by shape key."""
    return {key: dataclasses.asdict(d) for (m, key), d in sorted(_STATE.decisions.items()) if m == mode}


# ---------------------------------------------------------------- the ops, uniformly
_INPUT_NAMES = {
    "layer_norm": ("x", "weight", "bias"),
    "add_layer_norm": ("x", "weight", "bias", "residual"),
    "rope_2d": ("q", "k"),
    "attention": ("q", "k", "v"),
}
_OUTPUT_NAMES = {
    "layer_norm": ("y",),
    "add_layer_norm": ("y", "sum"),
    "rope_2d": ("q_rot", "k_rot"),
    "attention": ("o",),
}


def _triton_module(op: str):
    # the submodule itself (the package attribute of that name is the public function); Triton is
    # an optional dependency (Linux only), so this is where its ImportError surfaces
    return importlib.import_module(".layer_norm" if "layer_norm" in op else f".{op.replace('_2d', '')}", __package__)


def _functions(spec: KernelShape, module) -> dict[str, Callable]:
    """triton / torch (the path auto falls back to) / same_precision / reference, each taking
    (*grad_inputs, *constants), plus supports."""
    if "layer_norm" in spec.op:

        def bind(fn):
            return lambda x, w, b, r=None: fn(x, w, b, LAYER_NORM_EPS, r)

        fns = (module.layer_norm, reference.layer_norm, reference.layer_norm_same_precision, reference.layer_norm)
        supports = module.supports
    elif spec.op == "rope_2d":

        def bind(fn):
            return lambda q, k, sin, cos: fn(q, k, sin, cos, spec.prefix_tokens)

        fns = (module.rope_2d, reference.rope_2d, reference.rope_2d_same_precision, reference.rope_2d)
        supports = lambda q, k, sin, cos: module.supports(q, k, sin, cos, spec.prefix_tokens)  # noqa: E731
    else:

        def bind(fn):
            return lambda q, k, v: fn(q, k, v)

        fns = (module.attention, reference.sdpa_attention, reference.attention_same_precision, reference.attention)
        supports = module.supports
    named = dict(zip(("triton", "torch", "same_precision", "reference"), map(bind, fns)))
    for provider in ("triton", "torch"):
        if _STATE.hook is not None:
            named[provider] = _STATE.hook(spec.op, provider, named[provider])
    return {**named, "supports": supports}


def _inputs(spec: KernelShape, accuracy: bool, seed: int = 0):
    """(grad_inputs, constants, upstream gradients) for spec, from a generator of their own (the
    global RNG stays untouched); accuracy: at most ACCURACY_SAMPLES samples / ACCURACY_ROWS rows."""
    device = torch.device(spec.device)
    gen = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *size, dtype=spec.dtype: torch.randn(*size, generator=gen, device=device, dtype=dtype)  # noqa: E731
    if "layer_norm" in spec.op:
        rows, hidden = spec.shape
        rows = min(rows, ACCURACY_ROWS) if accuracy else rows
        grad = [rand(rows, hidden), 1 + 0.1 * rand(hidden), 0.1 * rand(hidden)]
        grad += [rand(rows, hidden)] if spec.op == "add_layer_norm" else []
        constants = []
    else:
        batch, heads, tokens, head_dim = spec.shape
        qkv_shape = (min(batch, ACCURACY_SAMPLES) if accuracy else batch, heads, tokens, head_dim)
        grad = [rand(*qkv_shape) for _ in range(3 if spec.op == "attention" else 2)]
        constants = []
        if spec.op == "rope_2d":
            angles = 6.3 * torch.rand(tokens - spec.prefix_tokens, head_dim, generator=gen, device=device)
            constants = [angles.sin(), angles.cos()]
    upstream = [rand(*grad[0].shape) for _ in _OUTPUT_NAMES[spec.op]]  # every output has input 0's shape
    return grad, constants, upstream


# ---------------------------------------------------------------- accuracy and timing
def _one_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _accuracy_problems(spec: KernelShape, fns: dict[str, Callable]) -> tuple[list[str], list[str]]:
    """(ours' problems, the PyTorch path's problems) under the accuracy rule, outputs and gradients."""
    grad_inputs, constants, upstream = _inputs(spec, accuracy=True)
    ref = outputs_and_grads(
        fns["reference"], leaf_copies(grad_inputs, torch.float64), [c.double() for c in constants], upstream
    )
    same = outputs_and_grads(fns["same_precision"], leaf_copies(grad_inputs), constants, upstream)
    names = list(_OUTPUT_NAMES[spec.op]) + [f"d{name}" for name in _INPUT_NAMES[spec.op]]
    rows = grad_inputs[0].numel() // grad_inputs[0].shape[-1]
    summed = {"dweight": rows, "dbias": rows}  # LayerNorm's dW, dB sum over rows

    def problems_of(provider: str) -> list[str]:
        try:
            got = outputs_and_grads(fns[provider], leaf_copies(grad_inputs), constants, upstream)
        except Exception as error:  # a kernel that cannot run here has failed its check
            return [f"raised {_one_line(error)}"]
        found = [
            tolerance_problem(n, g, s, r, atol_for(spec.dtype, summed.get(n, 1)))
            for n, g, s, r in zip(names, got, same, ref)
        ]
        return [p for p in found if p] or ([] if len(got) == len(ref) else [f"{len(got)} results, not {len(ref)}"])

    return problems_of("triton"), problems_of("torch")


def median_ms(run: Callable[[], None], device: torch.device, warmup: int, reps: int) -> float:
    """Median wall time of run() in ms after warm-up; CUDA events on a GPU (no host sync per rep)."""
    for _ in range(warmup):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            run()
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(start.elapsed_time(end) for start, end in events)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _fwd_bwd_ms(fn: Callable, spec: KernelShape, warmup: int, reps: int) -> float:
    grad_inputs, constants, upstream = _inputs(spec, accuracy=False, seed=1)
    grad_inputs = leaf_copies(grad_inputs)

    def run():
        torch.autograd.grad(as_tuple(fn(*grad_inputs, *constants)), grad_inputs, upstream)

    return median_ms(run, torch.device(spec.device), warmup, reps)


def _check(spec: KernelShape, mode: str, warmup: int, reps: int) -> Decision:
    """One shape class on this rank: accuracy of both paths, then (if ours passed) the race."""
    shape = list(spec.shape)
    try:
        module = _triton_module(spec.op)
    except ImportError as error:
        return Decision(
            spec.key(), shape, "failed", "torch", f"Triton does not import ({error})", problems=[str(error)]
        )
    fns = _functions(spec, module)
    grad_inputs, constants, _ = _inputs(spec, accuracy=True)
    if not fns["supports"](*grad_inputs, *constants):
        return Decision(spec.key(), shape, "unsupported", "torch", "outside what the Triton kernel supports")
    _STATE.checks_run += 1
    with torch.enable_grad(), torch.inference_mode(False), torch.autocast(spec.device, enabled=False):
        ours, theirs = _accuracy_problems(spec, fns)
        if ours:
            return Decision(spec.key(), shape, "failed", "torch", f"ours failed the check: {ours[0]}", problems=ours)
        triton_ms = _fwd_bwd_ms(fns["triton"], spec, warmup, reps)
        torch_ms = None if theirs else _fwd_bwd_ms(fns["torch"], spec, warmup, reps)
    if theirs:
        use, reason = "triton", f"passed; the PyTorch path failed the check ({theirs[0]})"
    else:
        faster = triton_ms < torch_ms
        timing = f"{triton_ms:.3f} ms vs PyTorch {torch_ms:.3f} ms forward+backward"
        use = "triton" if faster or mode == "triton" else "torch"
        reason = (
            f"passed and faster: {timing}"
            if faster
            else f"passed but slower: {timing}" + ("; used anyway: backend triton" if mode == "triton" else "")
        )
    return Decision(spec.key(), shape, "passed", use, reason, triton_ms, torch_ms, problems=theirs)


# ---------------------------------------------------------------- deciding, and agreeing across ranks
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _agree_across_ranks(flags: list[bool], fingerprint: int) -> list[bool]:
    """Every rank's flags MIN-reduced in one fixed-size all-reduce; raises on every rank alike
    when the ranks' fingerprints (backend + shape list) differ."""
    if not _distributed():
        return flags
    on_nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_nccl else torch.device("cpu")
    vector = torch.zeros(2 + MAX_SHAPES, dtype=torch.int64, device=device)
    vector[0], vector[1] = fingerprint, -fingerprint  # MIN of both gives min and max of the fingerprints
    vector[2 : 2 + len(flags)] = torch.tensor(flags, dtype=torch.int64)
    dist.all_reduce(vector, op=dist.ReduceOp.MIN)
    lowest, highest = int(vector[0]), -int(vector[1])
    if lowest != highest:
        raise RuntimeError(
            "eva_kernels.autotune: ranks asked about different kernel shapes or backends; call it "
            "with the same shapes on every rank (from the model build), after set_backend"
        )
    return [bool(flag) for flag in vector[2 : 2 + len(flags)].tolist()]


def _merge(local: Decision, agreed: bool) -> Decision:
    if local.use == "triton" and not agreed:
        local.use = "torch"
        local.reason += "; another rank's check failed or was slower: all ranks take PyTorch"
    return local


def _forced_failures(decided: Iterable[Decision]) -> str | None:
    # failed here, or passed here and failed on another rank
    bad = [d for d in decided if d.status == "failed" or (d.status == "passed" and d.use != "triton")]
    if not bad:
        return None
    return (
        "EVA_KERNELS=triton but the Triton kernel failed its self-check: "
        + "; ".join(f"{d.key}: {d.reason}" for d in bad)
        + ". Use EVA_KERNELS=auto (or torch) until it is fixed."
    )


def _log_decision(mode: str, decision: Decision) -> None:
    level = logging.WARNING if decision.status == "failed" or decision.problems else logging.INFO
    _log.log(level, "eva_kernels[%s] %s -> %s (%s)", mode, decision.key, decision.use, decision.reason)


def autotune(
    shapes: Iterable[KernelShape], mode: str, warmup: int | None = None, reps: int | None = None
) -> dict[str, Decision]:
    """Decide every shape's path under backend `mode` ('auto', 'triton', 'torch'): local checks,
    then one collective when torch.distributed is initialized. Cached; returns {key: Decision}."""
    unique = {spec.key(): spec for spec in shapes}
    if len(unique) > MAX_SHAPES:
        raise ValueError(f"eva_kernels.autotune: {len(unique)} shape classes, at most {MAX_SHAPES}")
    local = {key: _decide_locally(spec, mode, warmup, reps) for key, spec in unique.items()}
    fingerprint = zlib.crc32(json.dumps([mode, sorted(unique)]).encode())
    flags = _agree_across_ranks([local[key].use == "triton" for key in sorted(unique)], fingerprint)
    decided = {key: _merge(local[key], flag) for key, flag in zip(sorted(unique), flags)}
    for key, decision in decided.items():
        if (mode, key) not in _STATE.decisions:
            _log_decision(mode, decision)
        _STATE.decisions[(mode, key)] = decision
    problem = _forced_failures(decided.values()) if mode == "triton" else None
    if problem:
        raise RuntimeError(problem)
    return decided


def _decide_locally(spec: KernelShape, mode: str, warmup: int | None, reps: int | None) -> Decision:
    cached = _STATE.decisions.get((mode, spec.key()))
    if cached is not None:
        return cached
    if mode == "torch":
        return Decision(spec.key(), list(spec.shape), "not checked", "torch", "backend torch")
    if spec.device == "cuda" and not torch.cuda.is_available():  # e.g. the model build of a CPU test run
        return Decision(spec.key(), list(spec.shape), "not checked", "torch", "no CUDA device in this process")
    on_cuda = spec.device == "cuda"
    try:  # whatever goes wrong is a failed check: a rank must never skip the collective that follows
        return _check(
            spec,
            mode,
            warmup if warmup is not None else (5 if on_cuda else 1),
            reps if reps is not None else (20 if on_cuda else 3),
        )
    except Exception as error:
        why = f"the check raised {_one_line(error)}"
        return Decision(spec.key(), list(spec.shape), "failed", "torch", why, problems=[why])


def use_triton(spec: KernelShape, mode: str) -> bool:
    """The dispatch's question for one call the kernel supports ('auto' or 'triton' mode)."""
    decision = _STATE.decisions.get((mode, spec.key()))
    if decision is None:
        if spec.device != "cuda":
            return mode == "triton"  # the CPU interpreter: tests check it; auto never picks it unasked
        if mode == "auto" and _distributed():
            decision = Decision(
                spec.key(),
                list(spec.shape),
                "not checked",
                "torch",
                "not autotuned: under torch.distributed only eva_kernels.autotune may pick Triton",
            )
            _log.warning("eva_kernels[auto] %s -> torch (%s)", decision.key, decision.reason)
            _STATE.decisions[(mode, spec.key())] = decision
            return False
        decision = _decide_locally(spec, mode, None, None)
        _log_decision(mode, decision)
        _STATE.decisions[(mode, spec.key())] = decision
    if mode == "triton" and decision.status == "failed":
        raise RuntimeError(_forced_failures([decision]))
    return decision.use == "triton"


# ---------------------------------------------------------------- shapes of live calls
def layer_norm_shape(x: torch.Tensor, residual: torch.Tensor | None) -> KernelShape:
    hidden = x.shape[-1]
    return KernelShape(
        "layer_norm" if residual is None else "add_layer_norm", (x.numel() // hidden, hidden), x.dtype, x.device.type
    )


def rope_shape(q: torch.Tensor, sin: torch.Tensor) -> KernelShape:
    return KernelShape("rope_2d", tuple(q.shape), q.dtype, q.device.type, q.shape[-2] - sin.shape[0])


def attention_shape(q: torch.Tensor) -> KernelShape:
    return KernelShape("attention", tuple(q.shape), q.dtype, q.device.type)
