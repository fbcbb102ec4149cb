"""tools/bench_data.py smoke test at a small size: every section runs and prints its table rows
(timings are not asserted: only that they are there and sane)."""

import importlib.util
import re
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_data.py"


def test_bench_data_prints_every_table(capsys):
    spec = importlib.util.spec_from_file_location("bench_data", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(["--rows", "20000", "--list-rows", "20000", "--workers", "2", "--images", "8"])
    out = capsys.readouterr().out
    assert "## Index: 20,000 rows, 2 forked workers" in out
    lookup = re.search(r"random lookup, warm, cpu / wall \(us\)\s+([\d.]+) /\s+([\d.]+)", out)
    assert lookup and 0 < float(lookup.group(1)) and 0 < float(lookup.group(2))
    assert "worker USS / PSS at 100% (MiB)" in out
    for size in ("500x375", "1024x768"):
        assert f"JPEGs {size} q90" in out
    shares = re.findall(r"ours: decode \+ crop \+ flip \((\w+)\)\s+\d+ img/s\s+[\d.]+ ms\s+= (\d+)% of the limit", out)
    assert {decoder for decoder, _ in shares} >= {"pillow"} and all(int(share) > 0 for _, share in shares)
    assert "(the limit)" in out and "stage: crop + resize + flip" in out
    assert re.search(r"random positioned reads via index\s+\d+ samples/s", out)
