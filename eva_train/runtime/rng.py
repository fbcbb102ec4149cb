"""Capture and restore every random number generator a training process draws from.

A resumed run must draw the same random numbers as the run that never stopped (drop-path,
dropout, anything seeded from the global generators), so a checkpoint stores each rank's
python, numpy, torch CPU and CUDA generator states and the resume puts them back.
"""
import random
from typing import Any, Dict

import numpy as np
import torch

RNG_KEYS = ("python", "numpy", "torch", "cuda")


def capture_rng_state() -> Dict[str, Any]:
    """This process's generator states; picklable, CPU tensors only."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    # Only this rank's device (one GPU per process), and only when CUDA is already initialised:
    # querying it otherwise would create contexts on every visible GPU.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Put back the states from `capture_rng_state()`; a missing CUDA entry leaves CUDA alone."""
    missing = [key for key in RNG_KEYS if key not in state]
    if missing:
        raise ValueError(f"rng state lacks {', '.join(missing)}; pass a dict made by capture_rng_state()")
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])  # the current device: set it before restoring
