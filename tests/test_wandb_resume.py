"""wandb (offline, the real library): one run per output dir across launches, one continuous step axis.

Each launch is its own process, as a requeue or a kill + resume is. The history is read back from
wandb's own offline files (its transaction log, parsed here with wandb's protobuf classes)."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("wandb")

# One launch of the metrics sink on rank 0: resumes at START (as if from a checkpoint there) and logs to END.
LAUNCH = """
import sys, types
from eva_train.train.metrics import MetricsSink
out, start, end = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = types.SimpleNamespace(wandb=True, wandb_project="eva-test", run_name="", progress_bar=False)
sink = MetricsSink(out, cfg, {"recipe": "test"}, 0, end, start)
for step in range(start + 1, end + 1):
    sink.write({"step": step, "loss": -step / 100.0, "mfu": None})
sink.close()
"""


def launch(out: Path, start: int, end: int) -> None:
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("WANDB_API_KEY", None)
    done = subprocess.run(
        [sys.executable, "-c", LAUNCH, str(out), str(start), str(end)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


def wandb_records(path: Path):
    """Records of a .wandb file: a ':W&B' header, then 32 KiB blocks of (crc, length, type) framed chunks."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunk = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += room
            continue
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def history(run_file: Path):
    rows = []
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows.append(row)
    return [row for row in rows if "step" in row]  # wandb's own bookkeeping rows carry no step


def test_two_launches_one_run_id_and_a_continuous_step_axis(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    launch(out, 0, 4)
    run_id = (out / "wandb_id").read_text().strip()
    launch(out, 3, 7)  # resumed from a step-3 checkpoint: step 4 is logged again
    assert (out / "wandb_id").read_text().strip() == run_id
    run_dirs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2 and all(d.name.endswith("-" + run_id) for d in run_dirs)
    first, second = (history(d / f"run-{run_id}.wandb") for d in run_dirs)
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    assert [r["step"] for r in second] == [4, 5, 6, 7]  # the x-axis goes on where the checkpoint was
    assert [r["loss"] for r in second] == [-0.04, -0.05, -0.06, -0.07]


def test_run_id_file_is_reused_and_only_made_once(tmp_path):
    from eva_train.train.metrics import wandb_run_id

    first = wandb_run_id(str(tmp_path))
    assert first and wandb_run_id(str(tmp_path)) == first
    (tmp_path / "wandb_id").write_text("abc123\n")  # a run id given by the user is kept
    assert wandb_run_id(str(tmp_path)) == "abc123"
