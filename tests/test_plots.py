"""Pictures of a run: tools/plot_run.py on metrics written line by line (as a live or resumed run leaves them)."""

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image

from eva_train.train.plots import draw_run_plots, load_series, resume_steps

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_lines(path: Path, records, torn_tail: str = "") -> None:
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records) + torn_tail)


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    height, width, _ = matplotlib.image.imread(path).shape
    assert height > 200 and width > 300, (path, height, width)


def fake_step(step: int) -> dict:
    return {
        "step": step,
        "loss": -0.5 - step / 100,
        "lr": 1e-3 * step / 10,
        "grad_norm": 1.0 / step,
        "images_per_sec": 100.0 + step,
        "mfu": None,
        "data_wait_frac": 0.1,
        "bad_samples": step // 4,
        "skipped_steps": 0,
        "memory_gib": 1.0,
    }


def test_plot_run_draws_valid_pngs_for_a_live_run(tmp_path):
    write_lines(tmp_path / "metrics.jsonl", [fake_step(s) for s in range(1, 6)], torn_tail='{"step": 6, "lo')
    write_lines(tmp_path / "launches.jsonl", [{"step": 0}])
    done = subprocess.run(
        [sys.executable, str(REPO / "tools/plot_run.py"), str(tmp_path)], capture_output=True, text=True, check=True
    )
    for name in ("loss", "grad_norm", "throughput", "data_wait", "health", "overview"):
        assert_png(tmp_path / "plots" / f"{name}.png")
        assert name in done.stdout
    assert not (tmp_path / "plots" / "knn.png").exists()  # no kNN logged, no empty picture


def test_resumed_run_is_one_continuous_curve_with_the_resume_marked(tmp_path):
    # first launch logged 1..6; it was killed, the resumed launch (from the step-4 checkpoint) logs 5..10
    write_lines(tmp_path / "launches.jsonl", [{"step": 0}, {"step": 4}])
    write_lines(tmp_path / "metrics.jsonl", [fake_step(s) for s in range(1, 5)] + [fake_step(s) for s in range(5, 11)])
    series = load_series(tmp_path)
    steps, losses = series["loss"]
    assert steps == list(range(1, 11))
    assert losses == [fake_step(s)["loss"] for s in range(1, 11)]
    assert resume_steps(tmp_path) == [4]
    written = draw_run_plots(tmp_path)
    assert_png(written["loss"])


def test_closing_report_is_a_bar_chart(tmp_path):
    write_lines(tmp_path / "metrics.jsonl", [fake_step(1)])
    report = {
        "pretrained": {"knn_top1": 40.0, "knn_top5": 80.0, "linear_top1": 45.0, "linear_top5": 85.0},
        "random_init": {"knn_top1": 20.0, "knn_top5": 60.0, "linear_top1": 25.0, "linear_top5": 62.0},
        "num_classes": 10,
        "num_train": 100,
        "num_val": 50,
    }
    (tmp_path / "final_report.json").write_text(json.dumps(report))
    assert_png(draw_run_plots(tmp_path)["final_report"])


def test_plot_run_names_a_wrong_folder_in_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "tools/plot_run.py"), str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "metrics.jsonl not found" in done.stderr


def test_knn_picture_when_logged(tmp_path):
    write_lines(tmp_path / "metrics.jsonl", [fake_step(1), {**fake_step(2), "knn_top1": 33.0}])
    assert_png(draw_run_plots(tmp_path)["knn"])
