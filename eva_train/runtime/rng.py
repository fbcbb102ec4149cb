"""Capture and restore every random number generator a training process draws from.

A resumed run must draw the same random numbers as the run that never stopped (drop-path,
dropout, anything seeded from the global generators), so a checkpoint stores each rank's
python, numpy, torch CPU and CUDA generator states and the resume puts them back.

The states are kept as tensors and plain python values only (numpy's key array as an int64
tensor, python's as a tuple of ints), so a state file loads with `torch.load(weights_only=True)`:
reading a checkpoint never runs code from it.
"""

import pickle
import random
from typing import Any

import numpy as np
import torch

RNG_FORMAT = "eva_train.rng/2"
RNG_KEYS = ("python", "numpy", "torch", "cuda")


def capture_rng_state() -> dict[str, Any]:
    """This process's generator states: tensors and plain types only, CPU tensors only."""
    version, internal, gauss = random.getstate()
    algorithm, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "format": RNG_FORMAT,
        "python": {"version": int(version), "internal": tuple(int(v) for v in internal), "gauss": gauss},
        "numpy": {
            "algorithm": str(algorithm),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    # Only this rank's device (one GPU per process), and only when CUDA is already initialised:
    # querying it otherwise would create contexts on every visible GPU.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back the states from `capture_rng_state()`; a missing CUDA entry leaves CUDA alone."""
    missing = [key for key in RNG_KEYS if key not in state]
    if missing or state.get("format") != RNG_FORMAT:
        raise ValueError(
            f"rng state lacks {', '.join(missing) or 'format ' + RNG_FORMAT}; pass a dict made by "
            f"capture_rng_state() or read by load_rng_file()"
        )
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    np.random.set_state(
        (npy["algorithm"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])  # the current device: set it before restoring


def load_rng_file(path) -> dict[str, Any]:
    """A state file written by `torch.save(capture_rng_state())`, read with weights_only=True.

    Files of the previous format (numpy's state as a pickled ndarray) are read with torch's
    weights-only unpickler too, allowing only numpy's array reconstruction, and converted."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        state = _load_legacy(path)
    except (RuntimeError, EOFError, OSError) as exc:  # truncated or not a torch.save file
        raise ValueError(
            f"{path} cannot be read ({type(exc).__name__}: {str(exc).strip()[:160]}); the save was "
            f"interrupted: resume from an earlier checkpoint"
        ) from None
    if not isinstance(state, dict) or not all(key in state for key in RNG_KEYS):
        raise ValueError(f"{path} is not an eva-train RNG state file; resume from a checkpoint eva-train wrote")
    return state


def _load_legacy(path) -> dict[str, Any]:
    try:  # only this old-format path needs numpy's array reconstruction
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct  # numpy 1
    allowed = [
        _reconstruct,
        (_reconstruct, "numpy.core.multiarray._reconstruct"),  # written by numpy 2 / 1
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
    ]
    try:
        with torch.serialization.safe_globals(allowed):
            old = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path} holds more than RNG states ({str(exc).splitlines()[0]}); refusing to unpickle "
            f"it: resume from a checkpoint eva-train wrote"
        ) from None
    if not isinstance(old, dict) or "format" in old or not all(key in old for key in RNG_KEYS):
        raise ValueError(f"{path} is not an eva-train RNG state file; resume from a checkpoint eva-train wrote")
    version, internal, gauss = old["python"]
    algorithm, keys, pos, has_gauss, cached_gaussian = old["numpy"]
    return {
        "format": RNG_FORMAT,
        "python": {"version": version, "internal": tuple(internal), "gauss": gauss},
        "numpy": {
            "algorithm": algorithm,
            "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": old["torch"],
        "cuda": old["cuda"],
    }
