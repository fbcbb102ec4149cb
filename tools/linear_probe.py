#!/usr/bin/env python
"""Linear probe of a pretrained EVA backbone: `python tools/linear_probe.py --recipe linear_demo
--checkpoint FILE.safetensors [--section.key=value ...]` (see eva_train/eval/cli.py)."""

import sys

from eva_train.eval.cli import main
from eva_train.eval.linear_probe import run_linear_probe

if __name__ == "__main__":
    sys.exit(main(None, "linear_vit_b16", "linear", run_linear_probe))
