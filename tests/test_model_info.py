"""tools/model_info.py --seed-table against the numbers printed in mmpretrain's EVA tables (copied here from the
page, not from the tool): parameters equal to the table's two decimals, multiply-accumulates within 1%."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (variant, params in M, GMACs) per row, in the page's order: pretrain rows, then the fine-tune rows.
MMPRETRAIN_EVA_PAGE = [
    ("eva_mae_b16", 111.78, 17.58),
    ("eva_l_p14", 303.18, 81.08),
    ("eva_g_p16", 1011.32, 203.52),
    ("eva_g_p14", 1011.60, 267.17),
    ("eva_mae_b16", 86.57, 17.58),
    ("eva_l_p14", 304.14, 61.57),
    ("eva_l_p14", 304.53, 191.10),
    ("eva_g_p14", 1013.01, 620.64),
    ("eva_g_p14", 1014.45, 1906.76),
]


def test_seed_table_rows_match_the_published_numbers():
    done = subprocess.run(
        [sys.executable, str(REPO / "tools/model_info.py"), "--seed-table"], capture_output=True, text=True, check=True
    )
    rows = [line.split() for line in done.stdout.splitlines()[1:]]
    assert len(rows) == len(MMPRETRAIN_EVA_PAGE)
    for fields, (variant, params_m, gmacs) in zip(rows, MMPRETRAIN_EVA_PAGE):
        ours_params = int(fields[-6].replace(",", ""))
        ours_gmacs = float(fields[-3])
        assert variant in fields, fields
        assert round(ours_params / 1e6, 2) == params_m, fields
        assert abs(ours_gmacs / gmacs - 1) < 0.01, fields
