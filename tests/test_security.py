"""No code from a checkpoint runs: crafted torch.save files whose pickle calls `os.system` or
`builtins.exec` (to write a marker file) are refused with exit 2 and one line naming the global, by
the consolidation CLI, `pretrain.py --resume DIR` and `model.init_from`; the marker never appears."""

import json
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from eva_train.runtime import torch_zip
from eva_train.runtime.rng import load_rng_file

REPO = Path(__file__).resolve().parents[1]


class SystemCall:
    """Unpickling calls os.system(command)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class ExecCall:
    """Unpickling calls builtins.exec(code)."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def payloads(marker: Path):
    return {
        "os.system": SystemCall(f"touch {marker}"),
        "builtins.exec": ExecCall(f"open({str(marker)!r}, 'w').write('ran')"),
    }


def crafted_model_states(path: Path, payload, protocol: int = 2) -> Path:
    """A real torch.save zip that looks like DeepSpeed's ZeRO-3 model states, one value a payload."""
    torch.save(
        {
            "module": OrderedDict(w=torch.ones(3)),
            "buffer_names": [],
            "param_shapes": [{"w": torch.Size([3])}],
            "dp_world_size": 1,
            "ds_version": "0.19.8",
            "ds_config": payload,
        },
        path,
        pickle_protocol=protocol,
    )
    return path


def crafted_tag(root: Path, payload) -> Path:
    """OUT/checkpoints/step_00000001 with a COMPLETE marker and every file a 1-rank ZeRO-3 save has."""
    tag = root / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    crafted_model_states(tag / "zero_pp_rank_0_mp_rank_00_model_states.pt", payload)
    torch.save({"optimizer_state_dict": {"zero_stage": 3}}, tag / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (tag / "COMPLETE").write_text(json.dumps({"step": 1, "world_size": 1, "zero_stage": 3}))
    (root / "checkpoints" / "latest").write_text(tag.name)
    return tag


def run(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", WANDB_MODE="offline")
    return subprocess.run(
        [sys.executable, *map(str, args)], env=env, capture_output=True, text=True, timeout=300, cwd=kw.get("cwd", REPO)
    )


@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL and STACK_GLOBAL opcodes
@pytest.mark.parametrize("name", ["os.system", "builtins.exec"])
def test_reader_refuses_any_global_off_the_list(tmp_path, name, protocol):
    marker = tmp_path / "marker"
    path = crafted_model_states(tmp_path / "m.pt", payloads(marker)[name], protocol)
    module, attr = ("posix" if os.name == "posix" else "nt", "system") if name == "os.system" else name.split(".")
    with pytest.raises(torch_zip.UnsafePickleError, match=rf"refers to {module}\.{attr}"):
        torch_zip.load(path)
    with pytest.raises(torch_zip.UnsafePickleError):
        torch_zip.check_files(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["os.system", "builtins.exec"])
def test_consolidate_cli_exits_2_naming_the_global(tmp_path, name):
    marker = tmp_path / "marker"
    crafted_tag(tmp_path / "run", payloads(marker)[name])
    proc = run([REPO / "tools/consolidate.py", tmp_path / "run", "--out", tmp_path / "o.safetensors", "--no-progress"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "refusing to unpickle" in err[0], err
    assert ("system" if name == "os.system" else "builtins.exec") in err[0]
    assert not marker.exists() and not (tmp_path / "o.safetensors").exists()


def test_pretrain_resume_of_a_crafted_dir_exits_2(tmp_path):
    marker = tmp_path / "marker"
    tag = crafted_tag(tmp_path / "run", payloads(marker)["os.system"])
    proc = run([REPO / "eva_train/pretrain.py", "--resume", tag, "--output_dir", tmp_path / "out"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.strip().splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "refusing" in lines[0] and "system" in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


def test_pretrain_init_from_a_crafted_file_exits_2(tmp_path):
    marker = tmp_path / "marker"
    weights = tmp_path / "weights.pt"
    torch.save({"pos_embed": torch.zeros(1, 2), "evil": SystemCall(f"touch {marker}")}, weights)
    proc = run(
        [REPO / "eva_train/pretrain.py", f"--model.init_from={weights}", "--output_dir", tmp_path / "out", "--dry-run"]
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "model.init_from" in proc.stderr
    assert not marker.exists()


def test_rng_state_file_with_code_is_refused(tmp_path):
    marker = tmp_path / "marker"
    torch.save(
        {"python": None, "numpy": SystemCall(f"touch {marker}"), "torch": torch.zeros(3), "cuda": None},
        tmp_path / "rank_00000.pt",
    )
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_rng_file(tmp_path / "rank_00000.pt")
    assert not marker.exists()


def test_rng_file_of_the_previous_format_is_converted_without_unpickling_code(tmp_path):
    """Checkpoints written before this format held numpy's state as a pickled ndarray: read with
    torch's weights-only unpickler allowing numpy's array reconstruction only, the draws match."""
    import random

    import numpy as np

    from eva_train.runtime.rng import restore_rng_state

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # a cached gaussian in numpy's state
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": None}
    torch.save(old, tmp_path / "rank_00000.pt")
    expected = (random.random(), float(np.random.randn()), torch.rand(2).tolist())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng_state(load_rng_file(tmp_path / "rank_00000.pt"))
    assert (random.random(), float(np.random.randn()), torch.rand(2).tolist()) == expected
