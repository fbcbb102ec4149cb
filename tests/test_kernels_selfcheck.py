"""The kernels' self-check (eva_kernels.selfcheck): wrong kernels are rejected (auto) or fatal
(triton), slow ones are rejected by auto, correct fast ones are used; decisions are cached and
agree across real gloo ranks with one collective. On CPU the real kernels run in the Triton
interpreter; wrong/slow/fast kernels are injected through `set_test_hook`. -m gpu: on the card."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import eva_kernels
from eva_kernels import __main__ as eva_kernels_cli
from eva_kernels import reference, selfcheck
from eva_kernels.accuracy import as_tuple
from eva_kernels.selfcheck import KernelShape
from tests.helpers.kernels import kernels_runnable  # noqa: F401 (autouse fixture)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the real kernels run in the interpreter
SHAPE = KernelShape("attention", (1, 2, 17, 16), torch.float32, DEVICE)
OTHER = KernelShape("attention", (1, 2, 40, 16), torch.float32, DEVICE)  # another token bucket
DELAY_S = 0.03  # the injected slowness: far above the jitter of these millisecond-sized calls
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="what a process without CUDA does")


@pytest.fixture(autouse=True)
def fresh_selfcheck():
    selfcheck.reset()
    selfcheck.set_test_hook(None)
    yield
    selfcheck.reset()
    selfcheck.set_test_hook(None)


def _slowed(fn):
    def run(*args):
        time.sleep(DELAY_S)
        return fn(*args)

    return run


class _GradOff(torch.autograd.Function):
    """Identity forward; backward 3% off (a kernel whose forward is right and backward wrong)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.03


def wrong_forward(op, provider, fn):
    return (lambda *a: tuple(o * 1.05 for o in as_tuple(fn(*a)))) if provider == "triton" else fn


def wrong_backward(op, provider, fn):
    return (lambda *a: tuple(_GradOff.apply(o) for o in as_tuple(fn(*a)))) if provider == "triton" else fn


def slow_correct(op, provider, fn):
    return _slowed(fn) if provider == "triton" else fn


def fast_correct(op, provider, fn):
    # ours: SDPA itself (correct); the PyTorch path: the same, slowed
    return reference.sdpa_attention if provider == "triton" else _slowed(fn)


def raises(op, provider, fn):
    def boom(*a):
        raise RuntimeError("out of resources: shared memory")

    return boom if provider == "triton" else fn


@pytest.mark.parametrize(
    "hook, problem",
    [
        (wrong_forward, "o: max error"),
        (wrong_backward, "dq: max error"),
        (raises, "raised RuntimeError: out of resources"),
    ],
)
def test_wrong_kernel_rejected_by_auto_and_fatal_under_triton(hook, problem):
    selfcheck.set_test_hook(hook)
    decision = selfcheck.autotune([SHAPE], "auto", 0, 1)[SHAPE.key()]
    assert (decision.status, decision.use) == ("failed", "torch")
    assert problem in decision.reason and decision.triton_ms is None
    with pytest.raises(RuntimeError, match="EVA_KERNELS=triton but the Triton kernel failed its self-check"):
        selfcheck.autotune([SHAPE], "triton", 0, 1)
    eva_kernels.set_backend("triton")  # the failed decision is cached: the call itself fails loudly too
    q = torch.randn(SHAPE.shape, device=DEVICE)
    with pytest.raises(RuntimeError, match=problem.split(":")[0]):
        eva_kernels.attention(q, q, q)


def test_kernel_failing_only_at_the_timed_size_is_a_failed_check():
    """Accuracy is judged on 2 samples, timing runs the full batch: a launch that fails there counts too."""

    def fails_above_two_samples(op, provider, fn):
        def run(*a):
            if a[0].shape[0] > 2:
                raise RuntimeError("invalid grid")
            return fn(*a)

        return run if provider == "triton" else fn

    selfcheck.set_test_hook(fails_above_two_samples)
    shape = KernelShape("attention", (3, 2, 17, 16), torch.float32, DEVICE)
    decision = selfcheck.autotune([shape], "auto", 0, 1)[shape.key()]
    assert (decision.status, decision.use) == ("failed", "torch")
    assert decision.reason == "the check raised RuntimeError: invalid grid"


def test_slow_kernel_rejected_by_auto_kept_under_triton():
    selfcheck.set_test_hook(slow_correct)
    auto = selfcheck.autotune([SHAPE], "auto", 1, 3)[SHAPE.key()]
    assert (auto.status, auto.use) == ("passed", "torch") and auto.reason.startswith("passed but slower")
    assert auto.triton_ms > auto.torch_ms
    forced = selfcheck.autotune([SHAPE], "triton", 1, 3)[SHAPE.key()]
    assert (forced.status, forced.use) == ("passed", "triton") and "used anyway" in forced.reason


def test_fast_correct_kernel_accepted_cached_and_dispatched():
    calls = []
    selfcheck.set_test_hook(lambda op, provider, fn: calls.append(provider) or fast_correct(op, provider, fn))
    eva_kernels.set_backend("auto")
    rng_before = torch.get_rng_state()
    record = eva_kernels.autotune([SHAPE], warmup=1, reps=3)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the check draws from a generator of its own
    decision = record["kernels"][SHAPE.key()]
    assert (decision["status"], decision["use"]) == ("passed", "triton")
    assert decision["reason"].startswith("passed and faster") and decision["triton_ms"] < decision["torch_ms"]
    assert record["backend"] == "auto" and json.loads(json.dumps(record)) == record  # JSON-able as is
    assert selfcheck.checks_run() == 1 and calls == ["triton", "torch"]
    eva_kernels.autotune([SHAPE, SHAPE], warmup=1, reps=3)  # cached: no second check
    assert selfcheck.checks_run() == 1 and calls == ["triton", "torch"]
    # the live call of that class (another batch: same class) goes to our kernel; another class does not
    q = torch.randn(3, 2, 20, 16, device=DEVICE, requires_grad=True)
    assert eva_kernels.attention(q, q, q).grad_fn.name() == "AttentionFunctionBackward"
    q_other = torch.randn(OTHER.shape, device=DEVICE, requires_grad=True)
    assert eva_kernels.attention(q_other, q_other, q_other).grad_fn.name() != "AttentionFunctionBackward"


def test_broken_pytorch_path_leaves_ours_in_use():
    """cuDNN SDPA was wrong at 257 tokens before cuDNN 9.15.1: a passing kernel wins whatever the timing."""
    selfcheck.set_test_hook(lambda op, provider, fn: wrong_forward(op, "triton", fn) if provider == "torch" else fn)
    decision = selfcheck.autotune([SHAPE], "auto", 0, 1)[SHAPE.key()]
    assert (decision.status, decision.use) == ("passed", "triton")
    assert "the PyTorch path failed the check (o: max error" in decision.reason


def test_real_kernels_pass_their_selfcheck_at_tiny_shapes():
    shapes = eva_kernels.vit_shapes(1, 17, 176, 2, torch.float32, rope=True, device=DEVICE)  # head dim 88
    decided = selfcheck.autotune(shapes, "triton", 0, 1)
    assert sorted(k.split("/")[0] for k in decided) == ["add_layer_norm", "attention", "layer_norm", "rope_2d"]
    assert all((d.status, d.use, d.problems) == ("passed", "triton", []) for d in decided.values()), decided
    eva_kernels.set_backend("torch")
    assert all(d["status"] == "not checked" for d in eva_kernels.autotune(shapes)["kernels"].values())
    assert selfcheck.checks_run() == 4


@cpu_only
def test_cuda_shapes_without_cuda_are_left_to_pytorch():
    """A CPU run's model build may autotune its CUDA shapes: nothing to check, nothing to fail."""
    for mode in ("auto", "triton"):
        decided = selfcheck.autotune(eva_kernels.vit_shapes(2, 257, 1408, 16), mode)
        assert {(d.status, d.use) for d in decided.values()} == {("not checked", "torch")}
    assert selfcheck.checks_run() == 0


def test_shape_classes_and_bad_requests():
    assert SHAPE.key() == f"attention/float32/hd16-tokens<=32/{DEVICE}"
    assert KernelShape("attention", (8, 16, 257, 88)).key() == "attention/bfloat16/hd88-tokens<=512/cuda"
    assert KernelShape("layer_norm", (8 * 257, 1408)).shape_class() == "hidden<=2048"
    with pytest.raises(ValueError, match="unknown kernel op"):
        KernelShape("softmax", (2, 3))
    with pytest.raises(ValueError, match="at most"):
        selfcheck.autotune([KernelShape("layer_norm", (2, 2**i), device="cpu") for i in range(40)], "auto")


def _rank_worker(rank, world_size, init_method, out_dir):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    collectives, real_all_reduce = [], dist.all_reduce
    dist.all_reduce = lambda *a, **kw: collectives.append(1) or real_all_reduce(*a, **kw)
    selfcheck.set_test_hook(fast_correct if rank == 0 else wrong_forward)
    decision = selfcheck.autotune([SHAPE], "auto", 1, 3)[SHAPE.key()]
    result = {"use": decision.use, "reason": decision.reason, "collectives": len(collectives)}
    try:  # ranks asking different questions: every rank raises, none hangs
        selfcheck.autotune([SHAPE] if rank == 0 else [SHAPE, OTHER], "auto", 0, 1)
        result["mismatch"] = "no error"
    except RuntimeError as error:
        result["mismatch"] = str(error)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def test_ranks_agree_with_one_collective(tmp_path):
    context = mp.start_processes(
        _rank_worker,
        args=(2, f"file://{tmp_path}/rendezvous", str(tmp_path)),
        nprocs=2,
        start_method="spawn",
        join=False,
    )
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        assert time.monotonic() < deadline, "ranks hung"
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["use"] for r in results] == ["torch", "torch"]  # rank 0 passed and was faster, rank 1 was wrong
    assert "another rank's check failed" in results[0]["reason"] and "failed the check" in results[1]["reason"]
    assert [r["collectives"] for r in results] == [1, 1]
    assert all("ranks asked about different kernel shapes" in r["mismatch"] for r in results)


@pytest.mark.gpu
@pytest.mark.parametrize("width, heads, rope", [(1408, 16, False), (1024, 16, True)])  # EVA-g, EVA-02-L
def test_selfcheck_on_the_card(width, heads, rope):
    """The real kernels pass their self-check on this GPU at EVA shapes; the decision is then used."""
    shapes = eva_kernels.vit_shapes(8, 257, width, heads, torch.bfloat16, rope=rope)
    decided = selfcheck.autotune(shapes, "triton")
    assert all(d.status == "passed" and d.use == "triton" for d in decided.values()), decided
    auto = selfcheck.autotune(shapes, "auto")
    assert all(d.status == "passed" and d.triton_ms for d in auto.values()), auto  # ours is right on this card
    print(json.dumps({k: (d.use, d.reason) for k, d in auto.items()}, indent=1))  # shown by gpu_check.sh
    q = torch.randn(8, heads, 257, width // heads, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    eva_kernels.set_backend("auto")
    via_ours = eva_kernels.attention(q, q, q).grad_fn.name() == "AttentionFunctionBackward"
    assert via_ours == (auto[shapes[2].key()].use == "triton")


@pytest.mark.gpu
def test_lazy_check_on_first_use_without_autotune():
    eva_kernels.set_backend("auto")
    x = torch.randn(4, 257, 1408, device="cuda", dtype=torch.bfloat16)
    w, b = torch.ones(1408, device="cuda", dtype=torch.bfloat16), torch.zeros(1408, device="cuda", dtype=torch.bfloat16)
    eva_kernels.layer_norm(x, w, b)
    assert list(eva_kernels.decisions()["kernels"]) == ["layer_norm/bfloat16/hidden<=2048/cuda"]
    assert selfcheck.checks_run() == 1


def test_cli_reports_decisions(tmp_path):
    """python -m eva_kernels (gpu_check.sh's selfcheck step): the plumbing, on CPU."""
    out = tmp_path / "decisions.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "eva_kernels",
            "--device",
            DEVICE,
            "--preset",
            "tiny",
            "--backend",
            "torch",
            "--dtype",
            "float32",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "self-check (torch): 0 of 4 shape classes on Triton, 0 failed"
    record = json.loads(out.read_text())
    assert record["backend"] == "torch" and f"attention/float32/hd88-tokens<=32/{DEVICE}" in record["kernels"]


@cpu_only
def test_cli_user_error_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        eva_kernels_cli.main(["--preset", "eva_g"])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and stderr.count("\n") == 1 and "no CUDA device here" in stderr
