"""Read `torch.save` files (the zip format) as numpy arrays over a memory map, without torch.

Consolidation only reads tensors out of DeepSpeed's files; importing torch to do so costs ~3 s
here (more than reading the data), so this reader unpickles `data.pkl` with tensors rebuilt as
read-only numpy views of the mapped file: nothing is read from disk until it is used. Kept over
`torch.load(mmap=True, weights_only=True)` with the same DeepSpeed classes allow-listed because it
is faster: `tools/bench_consolidate.py run` (same consolidation, either reader) on a 2-rank ZeRO-3
bf16 eva_b_p16 checkpoint took 1.9 s vs 24.1 s cold, 1.5 s vs 10.6 s warm, peak RSS 0.19 vs 0.66 GiB.

A pickle can call any function it names, so the unpickler resolves only an explicit allow-list
(`ALLOWED_GLOBALS`): torch's tensor/storage rebuild functions, the few DeepSpeed classes its
checkpoints hold (as inert `DeepSpeedPlaceholder`s; `int()` gives an enum's value), and a short
list of builtins/collections/numpy types. Any other global is refused (`UnsafePickleError`, naming
it) before it is looked up: no code from a checkpoint runs. bfloat16 (which numpy lacks) is
`BF16Array`, a uint16 array subclass; `to_float32` widens it.
"""

import io
import mmap
import pickle
import struct
import zipfile
from collections import OrderedDict
from functools import cache
from pathlib import Path

import numpy as np

try:  # numpy 2 (numpy.core is a deprecated alias there)
    from numpy._core import multiarray as np_multiarray
except ImportError:  # numpy 1
    from numpy.core import multiarray as np_multiarray

LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # zip local file header: ..., name length, extra length
STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bf16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}


class TorchZipError(ValueError):
    pass


class UnsafePickleError(TorchZipError):
    """The file names a global outside `ALLOWED_GLOBALS`: it was not written by torch/DeepSpeed alone."""


class BF16Array(np.ndarray):
    """bfloat16 values held as their uint16 bit patterns; slicing and reshaping keep the type."""


class DeepSpeedPlaceholder:
    """Stands for one allow-listed DeepSpeed object we do not need (an enum, a loss scaler, ...)."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __int__(self):  # enums pickle as Enum(value)
        return int(self.args[0])

    def __repr__(self):
        return f"<{type(self).__qualname__} args={getattr(self, 'args', ())}>"


@cache
def _placeholder_type(module: str, name: str) -> type:
    return type(name, (DeepSpeedPlaceholder,), {"__module__": "placeholder." + module})


class _StorageType:
    def __init__(self, name: str):
        self.name, self.dtype = name, STORAGE_DTYPES[name]


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_):
    if 0 in size or not size:
        return storage[offset : offset + (0 if size else 1)].reshape(size)
    itemsize = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=[s * itemsize for s in stride], subok=True, writeable=False
    )


def _rebuild_from_type(func, new_type, args, state):
    if func is not _rebuild_tensor:  # torch.Tensor/Parameter subclass wrappers of a plain tensor only
        raise UnsafePickleError(f"_rebuild_from_type_v2 with {func!r}: not a tensor")
    return func(*args)


def _latin1_bytes(text: str, encoding: str) -> bytes:  # protocol 2 pickles bytes as _codecs.encode(str, latin1)
    if encoding != "latin1":
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


# Exactly what torch.save of a DeepSpeed (0.x) checkpoint refers to; (module, name) -> what it becomes.
_DEEPSPEED_OBJECTS = (
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)
ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): lambda data, *_: data,
    ("torch._utils", "_rebuild_parameter_with_state"): lambda data, *_: data,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Size"): tuple,
    ("torch", "Tensor"): None,
    ("torch.nn.parameter", "Parameter"): None,  # only as _rebuild_from_type_v2's type
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
    **{key: _placeholder_type(*key) for key in _DEEPSPEED_OBJECTS},
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): _latin1_bytes,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{
        (module, name): getattr(np_multiarray, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    },
}


def refuse_unlisted(module: str, name: str, path) -> None:
    """The one-line refusal for a global outside `ALLOWED_GLOBALS`, naming it."""
    raise UnsafePickleError(
        f"{path} refers to {module}.{name}, which a DeepSpeed checkpoint never holds; refusing "
        f"to unpickle it (it would run code of the file's choosing): use a checkpoint you wrote"
    )


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, storages, path):
        super().__init__(io.BytesIO(data))
        self._storages, self._path = storages, path

    def find_class(self, module, name):  # the only way a pickle reaches a global (GLOBAL, STACK_GLOBAL, EXT, INST)
        module = "builtins" if module == "__builtin__" else module  # protocol 2's name for it
        if (module, name) not in ALLOWED_GLOBALS:
            refuse_unlisted(module, name, self._path)
        return ALLOWED_GLOBALS[(module, name)]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] in ("storage", b"storage")):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"persistent id with storage type {storage_type!r}")
        return self._storages(storage_type, str(key), int(numel))


def load(path) -> object:
    """The unpickled object of a torch.save zip file, tensors as read-only numpy views of a map."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise TorchZipError(f"{path} is not a torch.save zip file ({exc})") from None
    with archive, open(path, "rb") as f:
        names = archive.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl")), None)
        if pkl is None:
            raise TorchZipError(f"{path} has no data.pkl: not a torch.save file (or the legacy format)")
        prefix = pkl[: -len("data.pkl")]
        order = prefix + "byteorder"
        if order in names and archive.read(order).strip() != b"little":
            raise TorchZipError(f"{path} was saved big-endian; load it with torch instead")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else b""
        infos = {info.filename: info for info in archive.infolist()}

        def storage(storage_type, key: str, numel: int) -> np.ndarray:
            info = infos.get(prefix + "data/" + key)
            if info is None or info.compress_type != zipfile.ZIP_STORED:
                raise TorchZipError(f"{path}: storage {key} is missing or compressed")
            header = LOCAL_HEADER.unpack_from(mapped, info.header_offset)
            start = info.header_offset + LOCAL_HEADER.size + header[-2] + header[-1]
            bf16 = storage_type.dtype == "bf16"
            dtype = np.dtype(np.uint16 if bf16 else storage_type.dtype)
            if start + numel * dtype.itemsize > len(mapped):
                raise TorchZipError(f"{path} is truncated: storage {key} ends past the end of the file")
            array = np.frombuffer(mapped, dtype, numel, start)
            return array.view(BF16Array) if bf16 else array

        try:
            return _Unpickler(archive.read(pkl), storage, path).load()
        except TorchZipError:
            raise
        except Exception as exc:  # noqa: BLE001 - a malformed pickle fails in many ways; one clear line
            raise TorchZipError(
                f"{path} cannot be unpickled as a torch.save file ({type(exc).__name__}: {exc})"
            ) from None


def check_files(root) -> int:
    """Unpickle every `*.pt` file under `root` (a file or a dir, recursively) with the allow-list,
    tensors as unread maps: `UnsafePickleError` names the first forbidden global. Run this on a
    checkpoint dir before anything loads it with `torch.load(weights_only=False)` (DeepSpeed does).
    Returns the number of files checked."""
    root = Path(root)
    files = sorted(root.rglob("*.pt")) if root.is_dir() else [root]
    for path in files:
        load(path)
    return len(files)


def is_float(array: np.ndarray) -> bool:
    return isinstance(array, BF16Array) or array.dtype.kind == "f"


def to_float32(array: np.ndarray) -> np.ndarray:
    if isinstance(array, BF16Array):
        return (np.asarray(array).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(array, np.float32)


def float32_to_bf16(array: np.ndarray) -> BF16Array:
    """Round to nearest even, as torch's .to(torch.bfloat16); NaN stays (quiet) NaN."""
    bits = np.ascontiguousarray(array, np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(array)
    if nan.any():
        rounded[nan] = (bits[nan] >> 16).astype(np.uint16) | 0x40
    return rounded.view(BF16Array)
