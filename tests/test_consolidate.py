"""Consolidation of real ZeRO-1/2/3 checkpoints (2 DeepSpeed CPU ranks) against zero_to_fp32."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eva_train.export.consolidate import ConsolidationError, ZeroCheckpoint, consolidate
from eva_train.export.safetensors_writer import read_metadata

REPO = Path(__file__).resolve().parents[1]


def _make(out: Path, model: str, stages: str, precision: str, port: int) -> None:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        str(REPO / "tools/bench_consolidate.py"),
        "make",
        "--model",
        model,
        "--stages",
        stages,
        "--precision",
        precision,
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def made_ckpts(tmp_path_factory):
    """One launch (2 ranks, bf16): a model that is not ours (tied weights, frozen param, buffer,
    odd sizes) under ZeRO-1/2/3, and our EVA-02 debug model (separate q/k/v, SwiGLU, sub-LN, RoPE)."""
    out = tmp_path_factory.mktemp("ckpts")
    _make(out, "toy,eva02_debug_p4", "1,2,3", "bf16", 29671)
    return out


@pytest.fixture(scope="module")
def toy_ckpts(made_ckpts):
    return made_ckpts / "toy"


@pytest.fixture(scope="module")
def eva_ckpt(made_ckpts):
    return made_ckpts / "eva02_debug_p4" / "zero3" / "checkpoints"


def _zero_to_fp32(ckpt_dir: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, to_torch_tensor

    return to_torch_tensor(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir)))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_equals_zero_to_fp32(toy_ckpts, tmp_path, stage):
    ckpt_dir = toy_ckpts / f"zero{stage}" / "checkpoints"
    report = consolidate(str(ckpt_dir), str(tmp_path / "out.safetensors"), progress=False)
    ours, theirs = load_file(report.path), _zero_to_fp32(ckpt_dir)
    assert set(theirs) <= set(ours)
    # zero_to_fp32 drops a frozen param that ZeRO-1 only keeps in the saved module; we keep it
    assert set(ours) - set(theirs) <= {"frozen_scale"}
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    assert torch.equal(ours["head.weight"], ours["emb.weight"])  # tied weights written as copies
    assert ours["step_count"].dtype == torch.int64
    assert torch.equal(ours["frozen_scale"], torch.full((5,), 0.5))
    assert ZeroCheckpoint.open(str(ckpt_dir)).stage == stage


@pytest.mark.slow
def test_consolidation_imports_neither_torch_nor_deepspeed(toy_ckpts, tmp_path):
    """Importing them costs more than the data here; a login node without DeepSpeed can consolidate."""
    code = (
        "import sys; from eva_train.export.consolidate import consolidate; "
        f"consolidate({str(toy_ckpts / 'zero3')!r}, {str(tmp_path / 'o.safetensors')!r}, progress=False); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"
    assert torch.equal(
        load_file(tmp_path / "o.safetensors")["emb.weight"],
        _zero_to_fp32(toy_ckpts / "zero3" / "checkpoints")["emb.weight"],
    )


@pytest.mark.slow
def test_bf16_output_and_metadata(toy_ckpts, tmp_path):
    ckpt_dir = toy_ckpts / "zero3" / "checkpoints"
    fp32 = load_file(consolidate(str(ckpt_dir), str(tmp_path / "a.safetensors"), progress=False).path)
    path = consolidate(
        str(ckpt_dir / "step_00000001"), str(tmp_path / "b.safetensors"), dtype="bf16", progress=False
    ).path
    bf16 = load_file(path)
    assert bf16["emb.weight"].dtype == torch.bfloat16 and bf16["step_count"].dtype == torch.int64
    assert torch.equal(bf16["emb.weight"], fp32["emb.weight"].to(torch.bfloat16))
    meta = read_metadata(path)
    assert meta["zero_stage"] == "3" and meta["world_size"] == "2" and meta["step"] == "1"
    assert meta["source_tag"] == "step_00000001"
    run_dir = consolidate(str(toy_ckpts / "zero3"), str(tmp_path / "c.safetensors"), progress=False).path
    assert torch.equal(load_file(run_dir)["emb.weight"], fp32["emb.weight"])  # OUT itself works too


@pytest.mark.slow
def test_compare_with_live_model_reference(toy_ckpts, tmp_path):
    ckpt_dir = toy_ckpts / "zero2" / "checkpoints"
    reference = _zero_to_fp32(ckpt_dir)
    consolidate(str(ckpt_dir), str(tmp_path / "ok.safetensors"), progress=False, reference=reference)
    reference["norm.bias"] = reference["norm.bias"] + 1.0
    with pytest.raises(ConsolidationError, match="differ from the live model.*norm.bias"):
        consolidate(str(ckpt_dir), str(tmp_path / "bad.safetensors"), progress=False, reference=reference)
    assert not (tmp_path / "bad.safetensors").exists()


def _copy_tag(toy_ckpts, tmp_path, stage=3) -> Path:
    dst = tmp_path / "ckpts"
    shutil.copytree(toy_ckpts / f"zero{stage}" / "checkpoints", dst)
    return dst


@pytest.mark.slow
def test_truncated_shard_is_a_clear_error(toy_ckpts, tmp_path):
    ckpt = _copy_tag(toy_ckpts, tmp_path)
    shard = next((ckpt / "step_00000001").glob("*zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ConsolidationError, match="rank_1.*truncated or corrupt"):
        consolidate(str(ckpt), str(tmp_path / "out.safetensors"), progress=False)
    assert not list(tmp_path.glob("out.safetensors*"))


@pytest.mark.slow
def test_missing_shard_is_a_clear_error(toy_ckpts, tmp_path):
    ckpt = _copy_tag(toy_ckpts, tmp_path, stage=1)
    next((ckpt / "step_00000001").glob("*zero_pp_rank_1_mp_rank_00_optim_states.pt")).unlink()
    with pytest.raises(ConsolidationError, match=r"incomplete.*ranks \[1\] are missing"):
        consolidate(str(ckpt), str(tmp_path / "out.safetensors"), progress=False)


@pytest.mark.slow
def test_nan_in_master_weights_is_refused(toy_ckpts, tmp_path):
    ckpt = _copy_tag(toy_ckpts, tmp_path)
    shard = next((ckpt / "step_00000001").glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    state = torch.load(shard, weights_only=False)
    with torch.no_grad():
        state["optimizer_state_dict"]["fp32_flat_groups"][0][3] = float("nan")
    torch.save(state, shard)
    with pytest.raises(ConsolidationError, match="NaN/Inf.*emb.weight"):
        consolidate(str(ckpt), str(tmp_path / "out.safetensors"), progress=False)


def test_foreign_or_empty_dirs_are_clear_errors(tmp_path):
    with pytest.raises(ConsolidationError, match="does not exist"):
        consolidate(str(tmp_path / "nope"), str(tmp_path / "o.safetensors"))
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(ConsolidationError, match="not a DeepSpeed checkpoint"):
        consolidate(str(tmp_path), str(tmp_path / "o.safetensors"))
    (tmp_path / "step_1").mkdir()
    (tmp_path / "step_1" / "mp_rank_00_model_states.pt").write_bytes(b"not a zip")
    with pytest.raises(ConsolidationError, match="no 'latest' file; pass --tag, one of: step_1"):
        consolidate(str(tmp_path), str(tmp_path / "o.safetensors"))
    with pytest.raises(ConsolidationError, match="no \\*_optim_states.pt"):
        consolidate(str(tmp_path), str(tmp_path / "o.safetensors"), tag="step_1")


@pytest.mark.slow
def test_eva_checkpoint_without_complete_marker_is_refused(eva_ckpt, tmp_path):
    ckpt = tmp_path / "ckpts"
    shutil.copytree(eva_ckpt, ckpt)
    (ckpt / "step_00000001" / "COMPLETE").unlink()
    with pytest.raises(ConsolidationError, match="no COMPLETE marker"):
        consolidate(str(ckpt), str(tmp_path / "out.safetensors"), progress=False)


def _cli(*args) -> int:
    """tools/consolidate.py's main, in this process (a fresh python per call costs ~10 s here)."""
    spec = importlib.util.spec_from_file_location("consolidate_cli", REPO / "tools/consolidate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in args])


@pytest.mark.slow
def test_cli_layouts_of_an_eva_checkpoint(eva_ckpt, tmp_path, capsys):
    from eva_train.export.layouts import to_layout

    native = tmp_path / "native.safetensors"
    assert _cli(eva_ckpt, "--out", native, "--check-model", "--no-progress") == 0
    assert "wrote" in capsys.readouterr().out
    ours = load_file(native)
    assert json.loads(read_metadata(str(native))["config"])["model"]["variant"] == "eva02_debug_p4"
    for layout in ("timm", "open_clip", "mmpretrain"):
        out = tmp_path / f"{layout}.safetensors"
        assert _cli(eva_ckpt, "--out", out, "--layout", layout, "--no-progress") == 0
        streamed, expected = load_file(out), to_layout(ours, layout)
        assert list(streamed) and set(streamed) == set(expected)
        assert all(torch.equal(streamed[k], expected[k]) for k in expected), layout
        assert read_metadata(str(out))["layout"] == layout


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    assert _cli(tmp_path, "--out", tmp_path / "x.safetensors") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "not a DeepSpeed checkpoint" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as exc:
        _cli(tmp_path, "--out", tmp_path / "x.bin")
    assert exc.value.code == 2


@pytest.mark.slow
def test_bench_consolidate_run_prints_the_table(eva_ckpt, capsys):
    spec = importlib.util.spec_from_file_location("bench_consolidate", REPO / "tools/bench_consolidate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(["run", str(eva_ckpt), "--repeats", "1", "--cache", "cold"])
    out = capsys.readouterr().out
    assert "tensors identical: True" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[1:2] == ["cold"]}
    assert set(rows) == {"zero_to_fp32", "eva_train.export.consolidate", "same+torch.load(mmap)"}
    assert rows["zero_to_fp32"][5:] == ["1.00", "1.00", "1.00"]
    assert all(float(v) > 0 for v in rows["eva_train.export.consolidate"][2:] + rows["same+torch.load(mmap)"][2:])
