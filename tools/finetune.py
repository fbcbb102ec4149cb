#!/usr/bin/env python
"""Fine-tune a pretrained EVA backbone: `python tools/finetune.py --recipe finetune_demo
--checkpoint FILE.safetensors [--section.key=value ...]` (see eva_train/eval/cli.py)."""
import sys

from eva_train.eval.cli import main
from eva_train.eval.finetune import run_finetune

if __name__ == "__main__":
    sys.exit(main(None, "finetune_vit_b16", "finetune", run_finetune))
