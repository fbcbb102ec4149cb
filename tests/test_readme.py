"""Every command shown in README.md runs: the ```bash blocks are parsed here, each command (a line,
its `\\` continuations joined, split at `&&` and `;`) is matched to exactly one rule of RULES, and a
command no rule covers fails `test_every_readme_command_has_a_rule`, so nobody can add an untested
command. `test_readme_commands_run` then runs them in README order:

  run       exactly as printed; only the paths of PATHS (README placeholder -> file this test made)
            are substituted, and `python` is this interpreter (the venv's)
  dry-run   needs a cluster: `sbatch [--nodes=N] SCRIPT` with the same variables becomes
            `NODES=N bash SCRIPT --dry-run` (the template's own check-before-queueing mode)
  demo      the first command (setup + demo) takes minutes: the same launcher, entry point and
            DeepSpeed config, taken from the README line, with fewer steps (DEMO_OVERRIDES)
  not-run   `tools/setup_env.sh` (installs into .venv, the interpreter running this) and the
            tests command (it would run this file again)
  download  fetch_gpu_wheels.sh downloads GBs of CUDA wheels: syntax-checked with `bash -n`, and
            every option the README gives it must appear in its --help
  no-wheels `gpu_check.sh --wheels W` needs that download: run with --dry-run on an empty W, which
            must refuse with the line naming fetch_gpu_wheels.sh
  gpu       bench_kernels.py: as printed where CUDA is; elsewhere it must refuse (exit 2) with a last
            line naming --cpu-smoke (tests/test_kernels_bench.py runs that mode)
The ```python block (features from a consolidated file) runs with its file names substituted, on
CPU when there is no CUDA device. The data are small generated images; the teacher of the EVA-g
dry run is a real open_clip ViT-L/14 state dict (`open_clip.create_model(..., pretrained=None)`).
"""

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
VENV_BIN = Path(sys.executable).parent
TIMEOUT_S = 900

RULES = [  # (kind, pattern of the command after the variable assignments); the first match wins
    ("not-run", r"bash tools/setup_env\.sh"),
    ("not-run", r"\.venv/bin/python -m pytest"),
    ("demo", r"\.venv/bin/deepspeed eva_train/pretrain\.py .*"),
    ("run", r"bash slurm/\w+\.sh --dry-run"),
    ("dry-run", r"sbatch (--nodes=\d+ )?slurm/\w+\.sh"),
    ("download", r"bash tools/fetch_gpu_wheels\.sh .*"),
    ("no-wheels", r"bash tools/gpu_check\.sh --wheels \S+"),
    ("run", r"bash tools/gpu_check\.sh"),
    ("gpu", r"python tools/bench_kernels\.py"),
    ("run", r"python tools/\w+\.py( .*)?"),
]
# README placeholder -> what this test made (relative to its workspace W); longest first when applied
PATHS = {
    "/data/in21k": "in21k",  # image class folders
    "/data/cc12m/": "cc12m/",  # webdataset tar shards
    "/data/m30m.arrow": "m30m.arrow",  # made by the README's build_index line
    "/weights/openai_clip_l14.pt": "openai_clip_l14.pt",  # open_clip ViT-L-14-quickgelu state dict
    "outputs/eva-g-1234": "outputs/demo",  # a job's run folder: the shortened demo's
    "outputs/": "outputs/",
    "data_cache/demo": "data_cache/demo",  # the demo's generated data
    "eva_g.safetensors": "eva_g.safetensors",
    "m.safetensors": "m.safetensors",
    "eva.safetensors": "m.safetensors",
    "SRC...": "in21k",
    "X.arrow": "x.arrow",
    "img.jpg": "img.jpg",
    "a.jpg": "img.jpg",
    "b.png": "img.png",
    "W": "wheels",
}
DEMO_OVERRIDES = [
    "--train.total_steps=2",
    "--checkpoint.every_steps=2",
    "--train.val_every_steps=0",
    "--eval.final_report=false",
    "--logging.wandb=false",
    "--logging.progress_bar=false",
    "--data.num_workers=0",
]


def readme_blocks(language: str):
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def readme_commands():
    """Commands of the ```bash blocks: continuations joined, comments dropped, split at && and ;."""
    commands = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(re.sub(r"(^|\s)#.*$", "", line).split())  # no '#' inside the README's quotes
            commands += [part.strip() for part in re.split(r" && |; ", line) if part.strip()]
    return commands


def split_env(command: str):
    """('A=1 B=2 cmd ...') -> ({'A': '1', 'B': '2'}, 'cmd ...')."""
    words = command.split(" ")
    env = {}
    while words and re.fullmatch(r"[A-Z_]+=\S+", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return env, " ".join(words)


def rule_of(command: str) -> str:
    _, rest = split_env(command)
    kinds = [kind for kind, pattern in RULES if re.fullmatch(pattern, rest)]
    return kinds[0] if kinds else ""


def test_every_readme_command_has_a_rule():
    commands = readme_commands()
    assert len(commands) >= 15, commands  # the parse found the blocks
    uncovered = [c for c in commands if not rule_of(c)]
    assert not uncovered, f"README commands no rule of tests/test_readme.py covers (add one, and run it): {uncovered}"
    assert rule_of(commands[0]) == "not-run" and rule_of(commands[1]) == "demo"  # setup + demo come first
    assert [rule_of(c) for c in commands[2:4]] == ["not-run", "not-run"]  # then setup + tests


def substitute(command: str, work: Path) -> str:
    for key in sorted(PATHS, key=len, reverse=True):
        command = re.sub(
            rf"(?<=[\s=]){re.escape(key)}(?=[\s/]|$)" if not key.endswith("/") else rf"(?<=[\s=]){re.escape(key)}",
            lambda _, key=key: str(work / PATHS[key]) + ("/" if key.endswith("/") else ""),
            command,
        )
    return re.sub(r"^python ", shlex.quote(sys.executable) + " ", command)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_bash(command: str, env: dict, work: Path, timeout=TIMEOUT_S):
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline", PATH=f"{VENV_BIN}:{os.environ['PATH']}", **env)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    try:
        return subprocess.run(
            ["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:  # one slow command is one failure in the list, not the end
        return subprocess.CompletedProcess(command, 124, f"{exc.stdout or ''}", f"timed out after {timeout} s")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The README's inputs, small: image folders, tar shards, one image, and the real teacher file."""
    import open_clip
    import torch
    from PIL import Image

    from tests.helpers.data import write_class_folder, write_tar_shards

    work = tmp_path_factory.mktemp("readme")
    write_class_folder(work / "in21k", per_class=4, size=64)
    write_tar_shards(work / "cc12m", num_samples=8, num_shards=2, img_size=64)
    shutil.copy(work / "in21k" / "class_0" / "0.png", work / "img.png")
    Image.open(work / "img.png").convert("RGB").save(work / "img.jpg")
    (work / "wheels").mkdir()
    clip = open_clip.create_model("ViT-L-14-quickgelu", pretrained=None)
    torch.save(clip.state_dict(), work / "openai_clip_l14.pt")
    del clip
    return work


def run_demo(command: str, work: Path):
    """The README's demo command with fewer steps: same launcher, entry point and DeepSpeed config."""
    launcher, *rest = shlex.split(command)
    args = [
        launcher,
        "--master_port",
        str(free_port()),
        *rest,
        "--output_dir",
        str(work / "outputs" / "demo"),
        f"--data.demo_root={work / 'data_cache' / 'demo'}",
        *DEMO_OVERRIDES,
    ]
    return run_bash(shlex.join(args), {}, work)


def run_command(command: str, work: Path):
    kind = rule_of(command)
    env, rest = split_env(substitute(command, work))
    if kind == "demo":
        return run_demo(rest, work)
    if kind == "dry-run":
        nodes = re.search(r"--nodes=(\d+)", rest)
        script = rest.split()[-1]
        return run_bash(f"bash {script} --dry-run", dict(env, **({"NODES": nodes.group(1)} if nodes else {})), work)
    if kind == "download":
        script = rest.split()[1]
        syntax = run_bash(f"bash -n {script}", {}, work)
        usage = run_bash(f"bash {script} --help", {}, work).stdout
        unknown = [w for w in rest.split()[2:] if w.startswith("--") and w not in usage]
        return subprocess.CompletedProcess(
            rest, syntax.returncode or int(bool(unknown)), usage, f"{syntax.stderr}{unknown}"
        )
    if kind == "gpu":
        import torch

        result = run_bash(rest, env, work)
        if torch.cuda.is_available():
            return result
        lines = result.stderr.strip().splitlines() or [""]
        refused = result.returncode == 2 and "--cpu-smoke" in lines[-1]  # argparse's usage, then the reason
        return subprocess.CompletedProcess(rest, 0 if refused else 1, result.stdout, result.stderr)
    if kind == "no-wheels":
        result = run_bash(f"{rest} --dry-run", env, work)
        refused = result.returncode == 2 and "build them with tools/fetch_gpu_wheels.sh" in result.stderr
        return subprocess.CompletedProcess(rest, 0 if refused else 1, result.stdout, result.stderr)
    return run_bash(rest, env, work)


def run_python_block(work: Path):
    """The ```python block with its file names substituted (on CPU when there is no CUDA device)."""
    import torch

    snippet = "\n".join(readme_blocks("python"))
    for key in ("eva.safetensors", "a.jpg", "b.png"):
        snippet = snippet.replace(f'"{key}"', repr(str(work / PATHS[key])))
    if not torch.cuda.is_available():
        snippet = snippet.replace('device="cuda"', 'device="cpu"')
    snippet += "\nassert feats['pooled'].shape[0] == 2 and feats['patch'].shape[0] == 2\n"
    return run_bash(f"{shlex.quote(sys.executable)} -c {shlex.quote(snippet)}", {}, work)


@pytest.mark.slow
def test_readme_commands_run(work):
    failures = []
    for command in readme_commands():
        if rule_of(command) == "not-run":
            continue
        result = run_command(command, work)
        if result.returncode != 0:
            failures.append(f"{command}\n  -> exit {result.returncode}: {(result.stdout + result.stderr)[-1500:]}")
    result = run_python_block(work)
    if result.returncode != 0:
        failures.append(f"README python block\n  -> {result.stderr[-1500:]}")
    assert not failures, "\n".join(failures)
    assert (work / "m30m.arrow").is_file() and (work / "outputs" / "ft" / "classifier.safetensors").is_file()


@pytest.mark.slow
def test_readme_dry_run_refuses_a_text_file_as_teacher(work, tmp_path):
    """The README's check-before-queueing command, given a text file as TEACHER, fails in one line."""
    command = next(c for c in readme_commands() if re.search(r"bash slurm/\w+\.sh --dry-run$", c))
    (tmp_path / "clip.pt").write_text("not weights\n")
    env, rest = split_env(substitute(command, work))
    index = work / "teacher_check.arrow"
    subprocess.run(
        [sys.executable, "tools/build_index.py", str(work / "in21k"), "--out", str(index)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    result = run_bash(rest, dict(env, TEACHER=str(tmp_path / "clip.pt"), DATA_INDEX=str(index)), work)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(errors) == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"teacher.checkpoint: {tmp_path / 'clip.pt'} could not be read as plain tensors" in errors[0]
