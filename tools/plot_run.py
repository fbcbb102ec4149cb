"""Draw the pictures of a run (finished, resumed or still going) from its output folder.

    python tools/plot_run.py outputs/demo            # -> outputs/demo/plots/*.png

Reads OUT/metrics.jsonl, OUT/launches.jsonl and OUT/final_report.json; writes loss, grad norm, throughput/MFU,
data wait, skipped steps / bad samples, kNN (when logged), the closing report and an overview page.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from eva_train.train.plots import draw_run_plots


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="a run's output folder (train.output_dir), holding metrics.jsonl")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    if not (out / "metrics.jsonl").exists():
        print(
            f"plot_run: {out}/metrics.jsonl not found; pass the run's output folder (train.output_dir)", file=sys.stderr
        )
        return 2
    written = draw_run_plots(out)
    if not written:
        print("plot_run: nothing drawn (matplotlib missing, or no metric lines yet)", file=sys.stderr)
        return 1
    for name, path in written.items():
        print(f"{name:<14} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
