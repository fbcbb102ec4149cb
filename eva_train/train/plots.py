"""Pictures of a run, drawn from its files only (metrics.jsonl, launches.jsonl, final_report.json), so they can
be drawn at the end of a run, by `tools/plot_run.py OUT` at any time, and on a run that is still going.

OUT/plots/: loss.png (train and val loss, lr on a twin axis), grad_norm.png, throughput.png (images/s and MFU),
data_wait.png, health.png (skipped steps and bad samples), knn.png (when kNN was logged), final_report.png (the
demo's closing report: pretrained vs random init), and overview.png (the curves on one page). Every curve is
plotted against the optimizer step; a dashed line marks each resume (a launch that started past step 0).
"""

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

Series = tuple[list[float], list[float]]

# (file stem, title, [(metric key, label, unit scale)], y label, twin (key, label) or None)
FIGURES = [
    (
        "loss",
        "Training objective (lower is better)",
        [("loss", "train loss", 1.0), ("val_loss", "val loss", 1.0)],
        "loss",
        ("lr", "learning rate"),
    ),
    ("grad_norm", "Gradient norm (before clipping)", [("grad_norm", "grad norm", 1.0)], "L2 norm", None),
    (
        "throughput",
        "Throughput",
        [("images_per_sec", "images/s (all ranks)", 1.0)],
        "images / s",
        ("mfu", "MFU (fraction of peak)"),
    ),
    ("data_wait", "Time spent waiting for data", [("data_wait_frac", "data wait", 100.0)], "% of step time", None),
    (
        "health",
        "Skipped steps and bad samples (cumulative)",
        [("skipped_steps", "skipped steps (non-finite)", 1.0), ("bad_samples", "bad samples replaced", 1.0)],
        "count",
        None,
    ),
    ("knn", "kNN monitor", [("knn_top1", "kNN top-1", 1.0), ("knn_top5", "kNN top-5", 1.0)], "accuracy (%)", None),
]


def read_jsonl(path: Path) -> list[dict]:
    """The whole lines of a JSON-lines file; a torn last line (a run killed mid-write, or still writing) is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def load_series(output_dir) -> dict[str, Series]:
    """metric -> (steps, values), one point per step (the last logged value wins), steps increasing.
    metrics.jsonl of a resumed run already holds one line per step (lines past the resumed checkpoint are moved
    aside), so this is one continuous curve across launches."""
    per_step: dict[str, dict[float, float]] = {}
    for record in read_jsonl(Path(output_dir) / "metrics.jsonl"):
        step = record.get("step")
        for key, value in record.items():
            if key != "step" and step is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
                per_step.setdefault(key, {})[step] = float(value)
    return {key: (sorted(points), [points[s] for s in sorted(points)]) for key, points in per_step.items()}


def resume_steps(output_dir) -> list[int]:
    """Steps at which a later launch resumed (launches.jsonl is appended by the metrics sink at every start)."""
    return sorted({int(r["step"]) for r in read_jsonl(Path(output_dir) / "launches.jsonl") if r.get("step", 0) > 0})


def _pyplot():
    """matplotlib with the file-only backend, or None with a one-line note (plots are never worth a crash)."""
    try:
        import matplotlib  # optional at run time: a cluster image without it still trains

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return None
    return plt


def _draw_curves(ax, series: dict[str, Series], figure, resumes: list[int]) -> bool:
    _, title, curves, ylabel, twin = figure
    drawn = False
    for key, label, scale in curves:
        if key in series:
            steps, values = series[key]
            ax.plot(steps, [v * scale for v in values], label=label, marker="o" if len(steps) < 30 else None, ms=3)
            drawn = True
    if not drawn:
        return False
    for step in resumes:
        ax.axvline(step, color="gray", linestyle="--", linewidth=1)
    if resumes:
        ax.plot([], [], color="gray", linestyle="--", label="resume")
    if ylabel == "count":  # cumulative counts: a flat zero line sits at the bottom, not mid-axis
        ax.set_ylim(bottom=0, top=max(1.0, ax.get_ylim()[1]))
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if twin and twin[0] in series:
        other = ax.twinx()
        steps, values = series[twin[0]]
        other.plot(steps, values, color="tab:red", alpha=0.6, label=twin[1])
        other.set_ylabel(twin[1])
        extra_handles, extra_labels = other.get_legend_handles_labels()
        handles, labels = handles + extra_handles, labels + extra_labels
    ax.legend(handles, labels, loc="best", fontsize="small")
    return True


def _save(fig, path: Path, written: dict[str, Path]) -> None:
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")  # a reader (or a second plot_run) never sees a half-written PNG
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    written[path.stem] = path


def _draw_report(plt, report_path: Path, out_dir: Path, written: dict[str, Path]) -> None:
    report = json.loads(report_path.read_text())
    metrics = [k for k in ("knn_top1", "knn_top5", "linear_top1", "linear_top5") if k in report["pretrained"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(metrics))
    ax.bar([x - 0.2 for x in xs], [report["pretrained"][k] for k in metrics], width=0.4, label="pretrained")
    ax.bar([x + 0.2 for x in xs], [report["random_init"][k] for k in metrics], width=0.4, label="random init")
    ax.axhline(100 / report["num_classes"], color="gray", linestyle=":", label="chance")
    ax.set_xticks(list(xs), [k.replace("_", " ") for k in metrics])
    ax.set_ylabel("accuracy (%)")
    ax.set_title(
        f"Closing report: {report['num_classes']} classes, {report['num_train']} train / {report['num_val']} val images"
    )
    ax.legend(fontsize="small")
    _save(fig, out_dir / "final_report.png", written)
    plt.close(fig)


def draw_run_plots(output_dir) -> dict[str, Path]:
    """Draw every picture the run's files allow into OUTPUT_DIR/plots/; returns {name: path}."""
    plt = _pyplot()
    if plt is None:
        return {}
    output_dir = Path(output_dir)
    out_dir = output_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    series, resumes, written = load_series(output_dir), resume_steps(output_dir), {}
    drawable = [f for f in FIGURES if any(key in series for key, _, _ in f[2])]
    for figure in drawable:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        _draw_curves(ax, series, figure, resumes)
        _save(fig, out_dir / f"{figure[0]}.png", written)
        plt.close(fig)
    if drawable:
        rows = (len(drawable) + 1) // 2
        fig, axes = plt.subplots(rows, 2, figsize=(14, 4 * rows), squeeze=False)
        for ax, figure in zip(axes.flat, drawable):
            _draw_curves(ax, series, figure, resumes)
        for ax in list(axes.flat)[len(drawable) :]:
            ax.axis("off")
        _save(fig, out_dir / "overview.png", written)
        plt.close(fig)
    report_path = output_dir / "final_report.json"
    if report_path.exists():
        _draw_report(plt, report_path, out_dir, written)
    return written


def draw_run_plots_safely(output_dir) -> dict[str, Path] | None:
    """For the end of a run: a picture that cannot be drawn is a warning, never a failed run."""
    try:
        written = draw_run_plots(output_dir)
    except Exception as error:  # plots are a convenience: a bad metrics line must not fail a finished run
        log.warning("plots skipped: %s: %s", type(error).__name__, error)
        return None
    if written:
        log.info("plots: %s", ", ".join(str(p) for p in written.values()))
    return written
