"""The one reader of weights files: a safetensors / .pt / .pth / .bin file -> its tensors.

Here (not in export/) because both the teacher (models/) and the weight import (export/) read such
files, and models/ may not import export/. A .pt file is read with `torch.load(weights_only=True)`,
so a pickle naming code is refused, never run. Training checkpoints wrap their weights: the first of
WRAPPER_KEYS found is taken, level after level, until a dict of tensors is reached (an EMA copy wins
over the raw weights, as in timm and the EVA releases).
"""

import zipfile
from collections import OrderedDict
from collections.abc import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
WRAPPER_KEYS = ("model_ema", "model", "module", "state_dict", "visual")


def read_state_dict(path: str, meta: bool = False) -> "OrderedDict[str, torch.Tensor]":
    """Tensors of a weights file, unwrapped; ValueError (one line, with the fix) when it holds none.
    meta=True: names, shapes and dtypes only, as meta tensors (the safetensors header; a zip torch file
    memory-mapped onto the meta device), so a start-up check of a 4 GB file reads almost nothing."""
    if str(path).endswith(".safetensors"):
        return OrderedDict(_safetensors_meta(str(path)) if meta else load_file(str(path)))
    try:
        mmap = meta and zipfile.is_zipfile(path)  # torch's mmap needs the zip format (legacy files: read)
        obj = torch.load(str(path), map_location="meta" if meta else "cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - weights_only refuses pickled code; any failure: say what to do
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        hint = "convert it to safetensors, or re-save only its state dict"
        if "TorchScript" in str(exc) or "constants.pkl" in str(exc):
            hint = (
                "it is a TorchScript archive (e.g. OpenAI's CLIP release): convert it once with `python -c \"import "
                "torch; torch.save(torch.jit.load('IN', map_location='cpu').state_dict(), 'OUT')\"`"
            )
        raise ValueError(f"{path} could not be read as plain tensors ({type(exc).__name__}: {text}); {hint}") from None
    return unwrap(obj)


def _safetensors_meta(path: str) -> "OrderedDict[str, torch.Tensor]":
    with safe_open(path, framework="pt") as f:
        return OrderedDict(
            (
                k,
                torch.empty(
                    f.get_slice(k).get_shape(),
                    dtype=_SAFETENSORS_DTYPES.get(f.get_slice(k).get_dtype(), torch.float32),
                    device="meta",
                ),
            )
            for k in f.keys()
        )


def unwrap(obj) -> "OrderedDict[str, torch.Tensor]":
    """The tensors inside a (possibly wrapped) state dict; non-tensor entries are left out."""
    while isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            raise ValueError(
                f"no weights found: top-level keys are {list(obj)[:8]}; expected tensors or one of "
                f"{', '.join(WRAPPER_KEYS)}"
            )
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"no weights found: the file holds a {type(obj).__name__}, not a dict of tensors")
    return OrderedDict((k, v) for k, v in obj.items() if isinstance(v, torch.Tensor))


def _is_tensor_dict(obj: Mapping) -> bool:
    return bool(obj) and sum(isinstance(v, torch.Tensor) for v in obj.values()) >= len(obj) / 2
