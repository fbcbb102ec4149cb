"""Index building from every source kind, exact round trip, merge weights, atomicity, checks, CLI."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from eva_train.data.build import build_index
from eva_train.data.errors import DataError
from eva_train.data.index import check_index, open_index
from eva_train.data.skips import SkipReport

REPO = Path(__file__).resolve().parents[1]


def jpeg(width=20, height=12, value=0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (value, 100, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def make_folder(root: Path, classes=("cat", "dog"), per_class=3) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.jpg").write_bytes(jpeg(10 + i, 8 + c, i))
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def make_tar(path: Path, samples) -> Path:
    """samples: list of dicts ext -> bytes; key = index."""
    with tarfile.open(path, "w") as tar:
        for i, sample in enumerate(samples):
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"sub/{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def read_image(reader, row) -> bytes:
    rec = reader.record(row)
    if rec.container_kind == "dir":
        return Path(rec.container_path, rec.path).read_bytes()
    with open(rec.container_path, "rb") as f:
        f.seek(rec.offset)
        return f.read(rec.size)


def test_image_folder_with_classes_round_trip(tmp_path):
    root = make_folder(tmp_path / "imgs")
    out = build_index([str(root)], str(tmp_path / "i.arrow"), probe=True, num_workers=1)
    reader = open_index(out)
    assert len(reader) == 6
    assert reader.sources[0].classes == ["cat", "dog"]
    recs = [reader.record(i) for i in range(6)]
    assert [r.path for r in recs] == [f"{c}/{i}.jpg" for c in ("cat", "dog") for i in range(3)]
    assert [r.label for r in recs] == [0, 0, 0, 1, 1, 1]
    assert [(r.width, r.height) for r in recs] == [(10 + i, 8 + c) for c in range(2) for i in range(3)]
    for r in recs:
        assert r.size == (root / r.path).stat().st_size and r.caption is None and r.json is None
        assert read_image(reader, r.row) == (root / r.path).read_bytes()


def test_flat_folder_unlabeled(tmp_path):
    (tmp_path / "flat").mkdir()
    for i in range(4):
        (tmp_path / "flat" / f"{i}.png").write_bytes(jpeg(value=i))  # bytes are JPEG: the name decides indexing
    reader = open_index(build_index([str(tmp_path / "flat")], str(tmp_path / "i.arrow"), num_workers=1))
    assert len(reader) == 4 and all(reader.record(i).label == -1 for i in range(4))
    assert (reader.record(0).width, reader.record(0).height) == (-1, -1)  # not probed


def test_tar_shards_offsets_captions_json_labels(tmp_path):
    images = [jpeg(value=i) for i in range(5)]
    samples = [
        {"jpg": img, "txt": f"caption {i}".encode(), "json": json.dumps({"i": i}).encode(), "cls": str(i % 3).encode()}
        for i, img in enumerate(images)
    ]
    samples[2].pop("txt"), samples[3].pop("json")
    samples.append({"txt": b"no image here"})  # a key without an image is not a sample
    (tmp_path / "shards").mkdir()
    make_tar(tmp_path / "shards" / "a.tar", samples[:3])
    make_tar(tmp_path / "shards" / "b.tar", samples[3:])
    reader = open_index(build_index([str(tmp_path / "shards")], str(tmp_path / "i.arrow"), probe=True, num_workers=2))
    assert len(reader) == 5
    for row in range(5):
        rec = reader.record(row)
        assert rec.container_kind == "tar"
        assert read_image(reader, row) == images[row]
        assert rec.label == row % 3
        assert rec.caption == (None if row == 2 else f"caption {row}")
        assert rec.json == (None if row == 3 else json.dumps({"i": row}))
        assert (rec.width, rec.height) == (20, 12)
    assert reader.record(3).path == "sub/0000.jpg"  # member name within b.tar


def test_parquet_with_bytes_and_with_paths(tmp_path):
    images = [jpeg(value=i) for i in range(4)]
    pq.write_table(
        pa.table(
            {
                "jpg": images,
                "caption": ["a", None, "c", "d"],
                "key": ["k0", "k1", "k2", "k3"],
                "width": [20] * 4,
                "height": [12] * 4,
            }
        ),
        tmp_path / "bytes.parquet",
        row_group_size=2,
    )
    (tmp_path / "pics").mkdir()
    for i in range(2):
        (tmp_path / "pics" / f"{i}.jpg").write_bytes(images[i])
    pq.write_table(
        pa.table({"path": ["pics/0.jpg", "pics/gone.jpg", "pics/1.jpg"], "label": [7, 9, 8]}),
        tmp_path / "paths.parquet",
    )
    report = SkipReport()
    out = build_index(
        [str(tmp_path / "bytes.parquet"), str(tmp_path / "paths.parquet")],
        str(tmp_path / "i.arrow"),
        num_workers=1,
        skips=report,
    )
    reader = open_index(out)
    assert len(reader) == 6 and report.counts == {"missing file": 1} and "gone.jpg" in report.summary()
    for row in range(4):
        rec = reader.record(row)
        assert rec.container_kind == "blob" and read_image(reader, row) == images[row]
        assert (rec.path, rec.width, rec.height) == (f"k{row}", 20, 12)
    assert [reader.record(r).caption for r in range(4)] == ["a", None, "c", "d"]
    assert [reader.record(r).label for r in (4, 5)] == [7, 8]
    assert read_image(reader, 5) == images[1]
    check_index([out])


def test_mixed_sources_with_weights(tmp_path):
    root = make_folder(tmp_path / "imgs")
    make_tar(tmp_path / "s.tar", [{"jpg": jpeg(value=i)} for i in range(4)])
    out = build_index(
        [str(root), str(tmp_path / "s.tar")],
        str(tmp_path / "i.arrow"),
        weights=[1.0, 2.5],
        names=["folder", "shards"],
        num_workers=1,
    )
    reader = open_index(out)
    assert [(s.name, s.start_row, s.num_rows, s.weight) for s in reader.sources] == [
        ("folder", 0, 6, 1.0),
        ("shards", 6, 4, 2.5),
    ]
    assert [reader.record(r).source for r in range(10)] == [0] * 6 + [1] * 4
    assert reader.epoch_length == 6 + 10
    for epoch in (0, 1):
        rows = [reader.virtual_to_row(v, epoch) for v in range(16)]
        assert rows[:6] == list(range(6))
        counts = np.bincount(np.array(rows[6:]) - 6, minlength=4)
        assert sorted(counts.tolist()) == [2, 2, 3, 3]  # 10 draws over 4 rows: each 2 or 3 times


def test_several_index_files_merge(tmp_path):
    a = build_index([str(make_folder(tmp_path / "a"))], str(tmp_path / "a.arrow"), num_workers=1)
    make_tar(tmp_path / "s.tar", [{"jpg": jpeg(value=i)} for i in range(4)])
    b = build_index([str(tmp_path / "s.tar")], str(tmp_path / "b.arrow"), num_workers=1)
    reader = open_index([a, b])
    assert len(reader) == 10 and len(reader.sources) == 2
    assert reader.record(7).source == 1 and reader.record(7).container_kind == "tar"
    assert read_image(reader, 9) == jpeg(value=3)


def test_atomic_write_keeps_old_index_on_crash(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs")
    out = tmp_path / "i.arrow"
    build_index([str(root)], str(out), num_workers=1)
    before = out.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(pa.ipc.RecordBatchFileWriter, "write_table", crash)
    (root / "dog" / "new.jpg").write_bytes(jpeg())
    with pytest.raises(KeyboardInterrupt):
        build_index([str(root)], str(out), num_workers=1)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.arrow", "imgs"]  # no temp file left


def test_incremental_reads_only_new_shards(tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    shards.mkdir()
    make_tar(shards / "a.tar", [{"jpg": jpeg(value=i)} for i in range(3)])
    out = str(tmp_path / "i.arrow")
    build_index([str(shards)], out, num_workers=1)
    make_tar(shards / "b.tar", [{"jpg": jpeg(value=9)}])
    from eva_train.data import build as build_mod

    seen = []
    real = build_mod.run_unit
    monkeypatch.setattr(build_mod, "run_unit", lambda unit: seen.append(unit.path) or real(unit))
    build_index([str(shards)], out, num_workers=1, incremental=True)
    assert seen == [str(shards / "b.tar")]
    reader = open_index(out)
    assert len(reader) == 4 and read_image(reader, 3) == jpeg(value=9) and read_image(reader, 0) == jpeg(value=0)


def test_check_index_errors_are_one_line_with_fix(tmp_path):
    with pytest.raises(DataError, match="does not exist; build it"):
        check_index([str(tmp_path / "missing.arrow")])
    (tmp_path / "junk.arrow").write_bytes(b"not arrow")
    with pytest.raises(DataError, match="not a readable Arrow IPC file"):
        check_index([str(tmp_path / "junk.arrow")])
    with (
        pa.OSFile(str(tmp_path / "other.arrow"), "wb") as sink,
        pa.ipc.new_file(sink, pa.schema([("x", pa.int32())])) as w,
    ):
        w.write_table(pa.table({"x": pa.array([1], pa.int32())}))
    with pytest.raises(DataError, match="lacks column path"):
        check_index([str(tmp_path / "other.arrow")])
    make_tar(tmp_path / "s.tar", [{"jpg": jpeg()}])
    out = build_index([str(tmp_path / "s.tar")], str(tmp_path / "t.arrow"), num_workers=1)
    os.remove(tmp_path / "s.tar")
    with pytest.raises(DataError, match="missing tar .*s.tar"):
        check_index([out])
    root = make_folder(tmp_path / "imgs")
    out = build_index([str(root)], str(tmp_path / "f.arrow"), num_workers=1)
    os.remove(root / "cat" / "0.jpg")
    with pytest.raises(DataError, match="missing file .*cat/0.jpg"):
        check_index([out])


def test_bad_source_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="hold no readable images"):
        build_index([str(tmp_path / "empty")], str(tmp_path / "i.arrow"), num_workers=1)
    with pytest.raises(DataError, match="holds no image folder"):
        build_index([str(tmp_path / "nothing*.tar")], str(tmp_path / "i.arrow"), num_workers=1)


def test_cli_builds_and_checks(tmp_path):
    root = make_folder(tmp_path / "imgs")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = tmp_path / "cli.arrow"
    run = subprocess.run(
        [sys.executable, str(REPO / "tools/build_index.py"), str(root), "--out", str(out), "--workers", "1"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    assert "6 rows" in run.stdout and len(open_index(str(out))) == 6
    run = subprocess.run(
        [sys.executable, str(REPO / "tools/build_index.py"), "--check", str(tmp_path / "nope.arrow")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 2 and "does not exist" in run.stderr
    (tmp_path / "a_folder.arrow").mkdir()  # a folder where the output file should go: fails as root too
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/build_index.py"),
            str(root),
            "--out",
            str(tmp_path / "a_folder.arrow"),
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 2 and run.stderr.startswith("error: --out") and run.stderr.count("\n") == 1, run.stderr
    assert "is a folder; pass a file path" in run.stderr  # said before any indexing (no progress bar)


def test_labels_array_matches_rows(tmp_path):
    a = build_index([str(make_folder(tmp_path / "a"))], str(tmp_path / "a.arrow"), num_workers=1)
    reader = open_index([a, a])
    labels = reader.labels()
    assert (
        labels.dtype == np.int64 and labels.tolist() == [reader.label(r) for r in range(12)] == [0, 0, 0, 1, 1, 1] * 2
    )


def test_unreadable_entries_are_skipped_with_a_summary(tmp_path):
    """One bad entry of each kind never stops a build; the CLI names each reason with a count and
    paths, and the index holds exactly the readable images. Tests run as root in CI, where chmod 000
    does not stop a read, so the unreadable files here are ones root cannot read either: a symlink
    loop (ELOOP) and a FIFO named like an image (opening it would block forever)."""
    root = make_folder(tmp_path / "imgs")
    cat = root / "cat"
    (cat / "gone.jpg").symlink_to(cat / "never_written.jpg")
    (cat / "loop.jpg").symlink_to(cat / "loop.jpg")
    os.mkfifo(cat / "fifo.jpg")
    (cat / "empty.jpg").write_bytes(b"")
    shards = tmp_path / "shards"
    shards.mkdir()
    truncated = make_tar(shards / "a_truncated.tar", [{"jpg": jpeg(value=i), "cls": b"1"} for i in range(3)])
    with tarfile.open(truncated) as tar:
        last = tar.getmember("sub/0002.jpg")
    os.truncate(truncated, last.offset_data + 10)  # the shard ends inside its last image
    corrupt = make_tar(shards / "b_corrupt.tar", [{"jpg": jpeg(value=10 + i)} for i in range(3)])
    with tarfile.open(corrupt) as tar:
        second = tar.getmember("sub/0001.jpg")
    with open(corrupt, "r+b") as f:  # garbage over the second member's header
        f.seek(second.offset)
        f.write(b"\xff" * 512)
    (shards / "c_junk.tar").write_bytes(b"this is not a tar file" * 100)
    out = tmp_path / "i.arrow"
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/build_index.py"),
            str(root),
            str(shards),
            "--out",
            str(out),
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    summary = {
        reason: line
        for line in lines
        for reason in (
            "dangling symlink",
            "symlink loop",
            "not a regular file",
            "empty file",
            "tar member runs past the end",
            "corrupt tar data",
            "unreadable shard",
        )
        if reason in line
    }
    assert len(summary) == 7, run.stdout
    assert "gone.jpg" in summary["dangling symlink"] and "loop.jpg" in summary["symlink loop"]
    assert "fifo.jpg" in summary["not a regular file"] and "empty.jpg" in summary["empty file"]
    assert "a_truncated.tar:sub/0002.jpg" in summary["tar member runs past the end"]
    assert f"b_corrupt.tar@{second.offset}" in summary["corrupt tar data"]
    assert "c_junk.tar" in summary["unreadable shard"]
    assert all(line.split()[0] == "1" for line in summary.values()), summary  # one of each
    assert "skipped 7 entries" in run.stdout
    reader = open_index(str(out))
    assert len(reader) == 6 + 2 + 1  # folder images, truncated shard's first two, corrupt's first
    want = [jpeg(10 + i, 8 + c, i) for c in range(2) for i in range(3)] + [jpeg(value=0), jpeg(value=1), jpeg(value=10)]
    assert [read_image(reader, r) for r in range(len(reader))] == want
    assert [reader.label(r) for r in range(6, 9)] == [1, 1, -1]
    assert len(reader.containers) == 1 + 2  # the unreadable shard adds no container


@pytest.mark.skipif(
    os.geteuid() == 0,
    reason="root reads a chmod 000 file; the FIFO and loop cases above cover unreadable files as root",
)
def test_permission_denied_is_skipped(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "dog" / "locked.jpg").write_bytes(jpeg())
    (root / "dog" / "locked.jpg").chmod(0)
    report = SkipReport()
    reader = open_index(build_index([str(root)], str(tmp_path / "i.arrow"), num_workers=1, skips=report))
    assert len(reader) == 6 and report.counts == {"permission denied": 1}


def test_skips_are_logged_without_a_report(tmp_path, caplog):
    root = make_folder(tmp_path / "imgs")
    (root / "dog" / "empty.jpg").write_bytes(b"")
    with caplog.at_level("WARNING", logger="eva_train.data.build"):
        build_index([str(root)], str(tmp_path / "i.arrow"), num_workers=1)
    assert "skipped 1 entries" in caplog.text and "empty.jpg" in caplog.text
