"""ZeRO-1/2/3 checkpoint -> one safetensors file, streaming one rank's shard at a time.

Each rank's optimizer file is memory-mapped and unpickled by `eva_train.runtime.torch_zip` (numpy views;
neither torch nor DeepSpeed is imported: that alone took longer than the data here): only its fp32
master partitions are read (the Adam moments' storages are never touched, so never paged in), and every
partition slice is written straight to its place in the output (`StreamingSafetensorsWriter`).
Peak memory is one rank's fp32 partition plus page cache, not the sum of the shards.

Where each element of a parameter lives (what DeepSpeed's `zero_to_fp32.py` reconstructs):
  ZeRO-1/2: per param group, the ranks' partitions concatenated form one flat vector holding the
            group's params in `param_shapes` order (plus `param_alignment_paddings`).
  ZeRO-3:   each param is split in world_size chunks of ceil(numel / world_size) elements; rank r
            stores chunk r of every param, in `param_shapes` order, across its flat groups.
Buffers come from rank 0's model states; frozen params from `frozen_param_fragments` (ZeRO-3: one
chunk per rank) or the saved module; tied params (`shared_params`) are written as copies.

Only files of a DeepSpeed checkpoint directory the user named are unpickled, and only with torch_zip's
allow-list: a file naming any other global is refused, naming it (no code from a checkpoint runs). Torch is imported
only to compare with a live model (`reference`).
"""

import json
import logging
import math
import os
import re
import time
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from eva_train.export.layouts import LayoutPlan, plan_layout
from eva_train.export.safetensors_writer import SAFETENSORS_NAMES, StreamingSafetensorsWriter
from eva_train.runtime import torch_zip

if TYPE_CHECKING:  # only a live-model comparison touches torch tensors
    import torch

log = logging.getLogger(__name__)
OUTPUT_DTYPES = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}  # safetensors dtype names
Piece = tuple[str, int, np.ndarray]  # (param name, flat element offset, flat values)


class ConsolidationError(RuntimeError):
    pass


def resolve_checkpoint(path: str, tag: str | None = None) -> Path:
    """OUT, OUT/checkpoints (uses `latest` or --tag), or a tag dir itself -> the tag dir."""
    root = Path(path)
    if not root.is_dir():
        raise ConsolidationError(f"checkpoint dir {root} does not exist; pass OUT/checkpoints or OUT/checkpoints/<tag>")
    if (root / "checkpoints").is_dir() and not (root / "latest").exists():
        root = root / "checkpoints"  # the run's output dir
    if tag:
        tag_dir = root / tag
        if not tag_dir.is_dir():
            raise ConsolidationError(f"tag '{tag}' not found in {root}; available: {_tags(root) or 'none'}")
        return tag_dir
    if any(root.glob("*model_states.pt")):
        return root
    latest = root / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if not (root / tag).is_dir():
            raise ConsolidationError(
                f"{latest} names tag '{tag}' but {root / tag} is missing; pass --tag "
                f"(available: {_tags(root) or 'none'})"
            )
        return root / tag
    if _tags(root):
        raise ConsolidationError(f"{root} has no 'latest' file; pass --tag, one of: {', '.join(_tags(root))}")
    raise ConsolidationError(
        f"{root} is not a DeepSpeed checkpoint: no *_model_states.pt files and no tag "
        f"dirs; pass OUT/checkpoints or OUT/checkpoints/<tag>"
    )


def _tags(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*model_states.pt")))


def _check_zip(path: Path) -> None:
    """torch.save writes a zip; a truncated file has no central directory (or short members)."""
    try:
        with zipfile.ZipFile(path) as archive:
            size = path.stat().st_size
            for info in archive.infolist():
                if info.header_offset + info.compress_size > size:
                    raise zipfile.BadZipFile("member beyond end of file")
    except (zipfile.BadZipFile, OSError) as exc:
        raise ConsolidationError(
            f"{path} is truncated or corrupt ({exc}); the save was probably interrupted: use an earlier tag (--tag)"
        ) from None


def _load_pickled(path: Path) -> dict:
    """Unpickled with numpy views (torch_zip checks each storage lies inside the file); every shard's
    zip directory was already checked by `_check_complete`."""
    try:
        return torch_zip.load(path)
    except torch_zip.UnsafePickleError as exc:  # a crafted file, not a damaged save: no --tag hint
        raise ConsolidationError(str(exc)) from None
    except (torch_zip.TorchZipError, ValueError, EOFError) as exc:
        raise ConsolidationError(
            f"{path} cannot be read as a DeepSpeed checkpoint file ({exc}); use an earlier tag (--tag)"
        ) from None


@dataclass
class ZeroCheckpoint:
    """What a DeepSpeed ZeRO checkpoint tag dir holds, read from rank 0's model states."""

    tag_dir: Path
    stage: int
    world_size: int
    optim_files: list[Path]
    model_files: list[Path]
    param_shapes: list["OrderedDict[str, tuple[int, ...]]"]  # per param group
    frozen_shapes: "OrderedDict[str, tuple[int, ...]]"
    buffers: "OrderedDict[str, np.ndarray]"
    module_only: "OrderedDict[str, np.ndarray]"  # ZeRO-1/2 frozen params found only in the module
    shared: dict[str, str]  # alias -> source
    client: dict = field(default_factory=dict)  # step, config (eva-train client_state)
    ds_version: str = ""
    partition_numels: list[int] = field(default_factory=list)  # ZeRO-1/2: rank 0's partition per group

    @classmethod
    def open(cls, path: str, tag: str | None = None) -> "ZeroCheckpoint":
        tag_dir = resolve_checkpoint(path, tag)
        optim_files = sorted(tag_dir.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=_rank_of)
        zero3_models = sorted(tag_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"), key=_rank_of)
        model_files = zero3_models or sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if not model_files:
            raise ConsolidationError(f"{tag_dir} is not a DeepSpeed checkpoint (no *_model_states.pt)")
        if not optim_files:
            raise ConsolidationError(
                f"{tag_dir} has no *_optim_states.pt files: not a ZeRO checkpoint, or saved "
                f"without optimizer state; nothing to consolidate"
            )
        states = _load_pickled(model_files[0])
        if "buffer_names" not in states or "param_shapes" not in states:
            raise ConsolidationError(f"{model_files[0]} is not a DeepSpeed model-states file")
        ckpt = cls._from_states(tag_dir, states, optim_files, model_files, zero3=bool(zero3_models))
        ckpt._check_complete()
        optim0 = _load_pickled(optim_files[0])["optimizer_state_dict"]
        ckpt.stage = int(optim0.get("zero_stage", ckpt.stage))
        # ZeRO-1/2: every rank but the last holds equal partitions (the last one drops group padding)
        ckpt.partition_numels = [t.size for t in optim0.get("single_partition_of_fp32_groups", [])]
        return ckpt

    @classmethod
    def _from_states(cls, tag_dir, states, optim_files, model_files, zero3: bool) -> "ZeroCheckpoint":
        module = states["module"]
        buffer_names = set(states["buffer_names"])
        param_shapes = states["param_shapes"]
        frozen = OrderedDict(states.get("frozen_param_shapes") or {})
        shared = dict(states.get("shared_params") or {})
        known = {n for group in param_shapes for n in group} | set(frozen) | buffer_names | set(shared)
        module_only = OrderedDict((k, v) for k, v in module.items() if k not in known) if not zero3 else OrderedDict()
        buffers = OrderedDict(
            (k, torch_zip.to_float32(v) if torch_zip.is_float(v) else v) for k, v in module.items() if k in buffer_names
        )
        ours = states.get("eva_client_state") or states  # eva-train's save keeps its client state under this key
        client = {k: ours[k] for k in ("step", "config", "samples_seen", "code_version") if k in ours}
        return cls(
            tag_dir,
            3 if zero3 else 2,
            int(states.get("dp_world_size", len(optim_files))),
            optim_files,
            model_files,
            param_shapes,
            frozen,
            buffers,
            module_only,
            shared,
            client,
            str(states.get("ds_version", "")),
        )

    def _check_complete(self) -> None:
        found = [_rank_of(p) for p in self.optim_files]
        missing = sorted(set(range(self.world_size)) - set(found))
        if missing or len(found) != self.world_size:
            raise ConsolidationError(
                f"{self.tag_dir} is incomplete: the checkpoint was saved by {self.world_size} "
                f"ranks but optimizer shards for ranks {missing or found} are missing; "
                f"use an earlier tag (--tag)"
            )
        if self.stage == 3 and len(self.model_files) != self.world_size:
            raise ConsolidationError(
                f"{self.tag_dir} is incomplete: {len(self.model_files)} of {self.world_size} "
                f"zero_pp_rank_*_model_states.pt files; use an earlier tag (--tag)"
            )
        marker = self.tag_dir / "COMPLETE"
        if marker.is_file():
            saved = json.loads(marker.read_text()).get("world_size", self.world_size)
            if saved != self.world_size:
                raise ConsolidationError(f"{marker} says world size {saved}, the files say {self.world_size}")
        elif "config" in self.client:
            raise ConsolidationError(
                f"{self.tag_dir} has no COMPLETE marker: the eva-train save was interrupted; use an earlier tag (--tag)"
            )
        else:
            log.warning("%s has no COMPLETE marker (not written by eva-train); checking shard files only", self.tag_dir)
        for path in self.optim_files + self.model_files:
            _check_zip(path)

    def tensor_shapes(self) -> "OrderedDict[str, tuple[int, ...]]":
        """Every output tensor (params, frozen params, buffers, tied copies) -> full shape."""
        shapes = OrderedDict((k, tuple(v.shape)) for k, v in self.buffers.items())
        shapes.update((k, tuple(v.shape)) for k, v in self.module_only.items())
        shapes.update((k, tuple(v)) for k, v in self.frozen_shapes.items())
        for group in self.param_shapes:
            shapes.update((k, tuple(v)) for k, v in group.items())
        for alias, source in self.shared.items():
            if source in shapes:
                shapes[alias] = shapes[source]
        return shapes

    def rank_pieces(self, rank: int) -> Iterator[Piece]:
        """Every (name, element offset, values) this rank holds; values are views into its mmap."""
        if rank == 0:
            for name, tensor in list(self.buffers.items()) + list(self.module_only.items()):
                yield name, 0, tensor.reshape(-1)
        optim = _load_pickled(self.optim_files[rank])["optimizer_state_dict"]
        if int(optim.get("zero_stage", 0)) not in (1, 2, 3):
            raise ConsolidationError(f"{self.optim_files[rank]}: unknown ZeRO stage {optim.get('zero_stage')}")
        if self.stage == 3:
            yield from self._zero3_frozen(rank)
            yield from _zero3_pieces(self.param_shapes, optim["fp32_flat_groups"], rank, self.world_size)
        else:
            if rank == 0:
                yield from self._zero2_frozen()
            yield from _zero12_pieces(
                self.param_shapes,
                optim["single_partition_of_fp32_groups"],
                [rank * n for n in self.partition_numels],
                optim.get("param_alignment_paddings"),
                self.optim_files[rank],
            )

    def _zero3_frozen(self, rank: int) -> Iterator[Piece]:
        if not self.frozen_shapes:
            return
        fragments = _load_pickled(self.model_files[rank])["frozen_param_fragments"]
        for name, shape in self.frozen_shapes.items():
            numel = math.prod(shape)
            chunk = math.ceil(numel / self.world_size)
            start = rank * chunk
            if start < numel:
                yield name, start, fragments[name].reshape(-1)[: min(chunk, numel - start)]

    def _zero2_frozen(self) -> Iterator[Piece]:
        if self.frozen_shapes:
            fragments = _load_pickled(self.model_files[0])["frozen_param_fragments"]
            for name in self.frozen_shapes:
                yield name, 0, fragments[name].reshape(-1)


def _rank_of(path: Path) -> int:
    match = re.search(r"zero_pp_rank_(\d+)_", path.name)
    return int(match.group(1)) if match else 0


def _zero3_pieces(param_shapes, flat_groups: list[np.ndarray], rank: int, world_size: int) -> Iterator[Piece]:
    cursor = _FlatCursor(flat_groups)
    for group in param_shapes:
        for name, shape in group.items():
            numel = math.prod(shape)
            chunk = math.ceil(numel / world_size)
            start = rank * chunk
            valid = max(0, min(chunk, numel - start))
            for offset, values in cursor.take(chunk, keep=valid):
                yield name, start + offset, values
    if cursor.position != cursor.total:
        raise ConsolidationError(
            f"rank {rank}: consumed {cursor.position} of {cursor.total} partition elements; "
            f"the checkpoint does not match its param_shapes"
        )


def _zero12_pieces(
    param_shapes, partitions: list[np.ndarray], part_starts: list[int], alignment_paddings, path: Path
) -> Iterator[Piece]:
    partitions = [p.reshape(-1) for p in partitions]
    if not len(partitions) == len(param_shapes) == len(part_starts):
        raise ConsolidationError(f"{path}: {len(partitions)} fp32 groups but {len(param_shapes)} param groups")
    for group_index, (group, partition, part_start) in enumerate(zip(param_shapes, partitions, part_starts)):
        part_end = part_start + partition.size
        offset = 0
        paddings = alignment_paddings[group_index] if alignment_paddings else [0] * len(group)
        for (name, shape), padding in zip(group.items(), paddings):
            numel = math.prod(shape)
            lo, hi = max(offset, part_start), min(offset + numel, part_end)
            if lo < hi:
                yield name, lo - offset, partition[lo - part_start : hi - part_start]
            offset += numel + padding


class _FlatCursor:
    """Reads consecutive ranges across a list of flat tensors (a rank's ZeRO-3 groups)."""

    def __init__(self, groups: list[np.ndarray]):
        self.groups = [g.reshape(-1) for g in groups]
        self.bounds = [0]
        for g in self.groups:
            self.bounds.append(self.bounds[-1] + g.size)
        self.total = self.bounds[-1]
        self.position = 0

    def take(self, length: int, keep: int) -> Iterator[tuple[int, np.ndarray]]:
        """Advance by `length`; yield (offset within the range, values) for its first `keep` elements."""
        start, end = self.position, self.position + keep
        self.position += length
        if self.position > self.total:
            raise ConsolidationError("partition data ends early: a shard is truncated or from another model")
        for index, g in enumerate(self.groups):
            lo, hi = max(start, self.bounds[index]), min(end, self.bounds[index + 1])
            if lo < hi:
                yield lo - start, g[lo - self.bounds[index] : hi - self.bounds[index]]


@dataclass
class ConsolidationReport:
    path: str
    tensors: int
    bytes: int
    seconds: float
    dropped: list[str]


def consolidate(
    ckpt_dir: str,
    out_path: str,
    tag: str | None = None,
    dtype: str = "fp32",
    layout: str = "native",
    progress: bool = True,
    swiglu: bool | None = None,
    reference: Mapping[str, "torch.Tensor"] | None = None,
) -> ConsolidationReport:
    """Write the checkpoint's full weights to `out_path` (safetensors) in `layout` names.
    `reference` (a live model's state dict, same layout) is compared tensor by tensor."""
    if dtype not in OUTPUT_DTYPES:
        raise ConsolidationError(f"--dtype {dtype} is unknown; use one of {', '.join(OUTPUT_DTYPES)}")
    start = time.perf_counter()
    ckpt = ZeroCheckpoint.open(ckpt_dir, tag)
    shapes = ckpt.tensor_shapes()
    plan = plan_layout(layout, shapes, swiglu)
    specs = _dest_specs(plan, ckpt, OUTPUT_DTYPES[dtype])
    writer = StreamingSafetensorsWriter(out_path, specs, _metadata(ckpt, layout, dtype))
    try:
        nonfinite = _stream(ckpt, plan, writer, progress)
        _verify(writer, plan, nonfinite)
        if reference is not None:
            compare_with_reference(writer.tmp_path, reference)
        path = writer.commit()
    except BaseException:
        writer.abort()
        raise
    return ConsolidationReport(path, len(specs), os.path.getsize(path), time.perf_counter() - start, plan.dropped)


def _dest_specs(plan: LayoutPlan, ckpt: ZeroCheckpoint, float_dtype: str):
    """dest name -> (shape, safetensors dtype): floats in the output dtype, integers as saved."""
    arrays = {**ckpt.buffers, **ckpt.module_only}  # everything else is an fp32 master partition
    dest_dtype = {}
    for src, routes in plan.routes.items():
        integer = src in arrays and not torch_zip.is_float(arrays[src])
        for route in routes:
            if route.dest is not None:
                dest_dtype[route.dest] = dtype_name(arrays[src]) if integer else float_dtype
    return OrderedDict((name, (shape, dest_dtype[name])) for name, shape in plan.dest_shapes.items())


def dtype_name(array: np.ndarray) -> str:
    return "BF16" if isinstance(array, torch_zip.BF16Array) else SAFETENSORS_NAMES[array.dtype]


def _metadata(ckpt: ZeroCheckpoint, layout: str, dtype: str) -> dict[str, str]:
    meta = {
        "format": "pt",
        "producer": "eva_train.export.consolidate",
        "layout": layout,
        "dtype": dtype,
        "source_tag": ckpt.tag_dir.name,
        "zero_stage": str(ckpt.stage),
        "world_size": str(ckpt.world_size),
        "ds_version": ckpt.ds_version,
    }
    if "config" in ckpt.client:
        meta["config"] = json.dumps(ckpt.client["config"], sort_keys=True, default=str)
    if "step" in ckpt.client:
        meta["step"] = str(ckpt.client["step"])
    return meta


def _stream(ckpt: ZeroCheckpoint, plan: LayoutPlan, writer: StreamingSafetensorsWriter, progress: bool) -> set:
    """Read rank by rank; one writer thread does the pwrites while this thread checks the next
    piece for NaN/Inf (both release the GIL, so reading and writing overlap)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    aliases: dict[str, list[str]] = {}
    for alias, source in ckpt.shared.items():
        aliases.setdefault(source, []).append(alias)
    nonfinite = set()
    bar = tqdm(total=ckpt.world_size, desc="consolidating ranks", unit="rank", disable=not progress)
    with ThreadPoolExecutor(max_workers=1) as pool:
        for rank in range(ckpt.world_size):
            pending = []
            for name, offset, values in ckpt.rank_pieces(rank):
                if torch_zip.is_float(values) and not _all_finite(values):
                    nonfinite.add(name)
                for target in [name] + aliases.get(name, []):
                    pending.append(pool.submit(_route_piece, plan, writer, target, offset, values))
            for future in pending:  # surface write errors; drops this rank's mmap before the next
                future.result()
            bar.update(1)
    bar.close()
    return nonfinite


def _all_finite(values: np.ndarray) -> bool:
    # a sum is NaN/Inf when any element is (much faster than isfinite().all()); the exact check
    # runs only when the sum is not finite (e.g. a finite overflow of huge values)
    values = torch_zip.to_float32(values) if isinstance(values, torch_zip.BF16Array) else values
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(values.sum())) or bool(np.isfinite(values).all())


def _route_piece(plan: LayoutPlan, writer, name: str, offset: int, values: np.ndarray) -> None:
    end = offset + values.size
    for route in plan.routes[name]:
        lo, hi = max(offset, route.src_start), min(end, route.src_start + route.length)
        if lo >= hi:
            continue
        piece = values[lo - offset : hi - offset]
        if route.dest is None:
            if bool(torch_zip.to_float32(piece).any() if torch_zip.is_float(piece) else piece.any()):
                raise ConsolidationError(
                    f"{name} has non-zero values where the {plan.layout} layout has none "
                    f"(a learned k bias); use --layout native"
                )
            continue
        writer.write(route.dest, route.dest_start + lo - route.src_start, piece)


def _verify(writer: StreamingSafetensorsWriter, plan: LayoutPlan, nonfinite: set) -> None:
    """Every tensor fully written; no NaN/Inf; the file reads back with the planned names/shapes."""
    if nonfinite:
        raise ConsolidationError(
            f"NaN/Inf in {len(nonfinite)} tensors, e.g. {sorted(nonfinite)[:5]}: the "
            f"checkpoint is from a diverged run; use an earlier tag (--tag)"
        )
    short = [
        f"{name} ({writer.written_elems[name]}/{math.prod(shape)})"
        for name, (shape, _) in writer.specs.items()
        if writer.written_elems[name] + plan.zero_fill.get(name, 0) != math.prod(shape)
    ]
    if short:
        raise ConsolidationError(
            f"{len(short)} tensors not fully covered by the shards, e.g. {short[:3]}: the "
            f"checkpoint does not match its param_shapes (mixed or partial save?)"
        )
    os.fsync(writer.fd)
    from safetensors import safe_open

    with safe_open(writer.tmp_path, "np") as f:
        names = list(f.keys())
        if sorted(names) != sorted(writer.specs):
            raise ConsolidationError(f"{writer.tmp_path} reads back {len(names)} tensors, expected {len(writer.specs)}")
        for name in names:
            if tuple(f.get_slice(name).get_shape()) != tuple(writer.specs[name][0]):
                raise ConsolidationError(f"{name} reads back with shape {f.get_slice(name).get_shape()}")


def compare_with_reference(path: str, reference: Mapping[str, "torch.Tensor"], atol: float = 0.0) -> None:
    """Every tensor of `reference` (e.g. a live model's state_dict, gathered) equals the file's
    (compared in the file's dtype); raises naming the first mismatches."""
    import torch
    from safetensors import safe_open

    bad = []
    with safe_open(path, "pt") as f:
        names = set(f.keys())
        missing = sorted(set(reference) - names)
        if missing:
            raise ConsolidationError(f"{len(missing)} live-model tensors are not in {path}, e.g. {missing[:3]}")
        for name, expected in reference.items():
            got = f.get_tensor(name)
            expected = expected.detach().to("cpu", got.dtype)
            if got.shape != expected.shape or not torch.allclose(got.float(), expected.float(), atol=atol, rtol=0):
                bad.append(name)
    if bad:
        raise ConsolidationError(f"{len(bad)} tensors differ from the live model, e.g. {bad[:5]}")
