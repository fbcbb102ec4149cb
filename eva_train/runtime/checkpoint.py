"""Save and resume training: DeepSpeed state + client state (step, sampler position, RNG, config).

Layout under `OUT/checkpoints/`:
    step_00001000/            DeepSpeed's files for that step (every rank writes its shards)
    step_00001000/rng/rank_00003.pt   rank 3's generator states (rank-private, unlike the rest)
    step_00001000/COMPLETE    json {step, world_size, zero_stage, time}; written last, by rank 0,
                              after a barrier that follows every rank's write
    latest                    the tag of the newest complete checkpoint (write-temp, fsync, rename)

Health (eva_train.train.health): a save happens only while no bad or spike streak is open, and its
COMPLETE says `"healthy": true, "confirmed": false`. The loop settles it: the first step applied from
its weights with a finite loss and gradient norm -> `"confirmed": true`; a divergence stop before any
such step -> `"healthy": false` (the update before the save blew the weights up, e.g. to a finite
6e29). Retention never deletes the newest confirmed healthy checkpoint, and keeps `keep_last` among
those not marked unhealthy; `auto` resume never picks an unhealthy one.
A COMPLETE without these keys (older runs) counts as confirmed healthy.

Crash safety: a tag dir without COMPLETE is never loaded (and is deleted by the next save), so a
kill at any point of a save leaves the previous checkpoint as the resume point. Retention removes
COMPLETE before the rest of an old tag, so a half-deleted dir is never mistaken for a checkpoint.

World-size change: DeepSpeed 0.19.8 refuses to load ZeRO optimizer shards on another data-parallel
size, so `prepare_resume` (before the engine is built) converts the checkpoint once (rank 0,
`deepspeed.checkpoint.ds_to_universal`) into `<tag>/universal/`, the engine is built with
DeepSpeed's public `checkpoint.load_universal` switch, and `load` reads the universal copy, which
re-partitions fp32 weights and Adam moments for the new world size.
"""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from eva_train.config import CheckpointConfig
from eva_train.errors import ConfigError, disk_full_error
from eva_train.runtime import torch_zip
from eva_train.runtime.fsio import atomic_write_text, fsync_path
from eva_train.runtime.rng import load_rng_file

log = logging.getLogger(__name__)

TAG_PATTERN = re.compile(r"^step_(\d{8})$")
COMPLETE_FILE = "COMPLETE"
LATEST_FILE = "latest"
UNIVERSAL_DIR = "universal"
CLIENT_KEY = "eva_client_state"  # our dict inside DeepSpeed's model-states file, apart from its own keys


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used, with the fix in the message."""


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def step_of_tag(tag: str) -> int | None:
    match = TAG_PATTERN.match(tag)
    return int(match.group(1)) if match else None


def check_checkpoint_config(ckpt_cfg: CheckpointConfig) -> None:
    """Cheap checks, before anything expensive starts; one line with the fix."""
    if ckpt_cfg.every_steps < 0:
        raise CheckpointError(
            f"checkpoint.every_steps={ckpt_cfg.every_steps} is negative; use 0 (only at the end) or a positive interval"
        )
    if ckpt_cfg.keep_last < 1:
        raise CheckpointError(
            f"checkpoint.keep_last={ckpt_cfg.keep_last} would delete the checkpoint just written; use 1 or more"
        )
    if ckpt_cfg.keep_every < 0:
        raise CheckpointError(
            f"checkpoint.keep_every={ckpt_cfg.keep_every} is negative; use 0 (none) or a step interval"
        )
    resume = ckpt_cfg.resume
    if resume not in ("auto", "none") and not os.path.exists(resume):
        raise CheckpointError(
            f"checkpoint.resume '{resume}' does not exist; pass auto, none, or the path of a "
            f"checkpoint dir (OUT/checkpoints/step_XXXXXXXX) or of a run's output dir"
        )
    if resume not in ("auto", "none"):
        check_safe_to_load(resolve_checkpoint_path(Path(resume)))


def check_safe_to_load(tag_dir: Path) -> None:
    """DeepSpeed 0.19.8's load_checkpoint (and ds_to_universal) unpickle every shard with
    torch.load(weights_only=False) and take no weights_only or allow-list option, so a crafted file
    in a resume dir would run its code. Every *.pt under the tag dir (universal/ and rng/ included)
    is unpickled first with the consolidation's allow-list (tensors stay unread maps), and a file
    naming any other global is refused here, before DeepSpeed sees the dir."""
    try:
        torch_zip.check_files(tag_dir)
    except torch_zip.TorchZipError as exc:
        raise CheckpointError(f"refusing to resume: {exc}") from None


# --- every file that marks progress is written temp -> fsync -> rename (eva_train.runtime.fsio)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(root: Path, skip=lambda name: False) -> None:
    """DeepSpeed's torch.save does not fsync; make its files durable before COMPLETE says so."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if not skip(name):
                fsync_path(os.path.join(dirpath, name))
        fsync_path(Path(dirpath))


def _is_rank_shard(name: str) -> bool:
    """DeepSpeed's per-rank shard files (`[bf16_]zero_pp_rank_{r}_mp_rank_00_*`): their writers fsync them."""
    return re.search(r"pp_rank_\d+_mp_rank_", name) is not None


def _fsync_own_shards(tag_dir: Path, rank: int) -> None:
    """Each rank flushes its own shards, in parallel with the others, before the commit barrier."""
    for path in tag_dir.glob(f"*pp_rank_{rank}_mp_rank_*"):
        fsync_path(str(path))


def _remove_tag_dir(path: Path) -> None:
    """COMPLETE goes first (and durably), so a crash mid-delete leaves an ignored, incomplete dir."""
    marker = path / COMPLETE_FILE
    if marker.exists():
        marker.unlink()
        fsync_path(path)
    shutil.rmtree(path, ignore_errors=True)


def read_complete(tag_dir: Path) -> dict[str, Any] | None:
    """The COMPLETE record of a tag dir, or None when the save never finished."""
    try:
        return json.loads((Path(tag_dir) / COMPLETE_FILE).read_text())
    except (OSError, ValueError):
        return None


def is_healthy(record: dict[str, Any] | None) -> bool:
    """Complete and not marked unhealthy (possibly still unconfirmed)."""
    return record is not None and record.get("healthy", True) is True


def is_confirmed(record: dict[str, Any] | None) -> bool:
    """Healthy, and a step run from its weights had a finite loss and gradient norm."""
    return is_healthy(record) and record.get("confirmed", True) is True


def list_tags(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every tag dir, complete or not, in step order."""
    if not ckpt_root.is_dir():
        return []
    found = [(step_of_tag(p.name), p) for p in ckpt_root.iterdir() if p.is_dir()]
    return sorted((step, p) for step, p in found if step is not None)


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def retained_steps(steps: list[int], keep_last: int, keep_every: int) -> list[int]:
    """Which complete checkpoints survive: the newest `keep_last`, plus every multiple of `keep_every`."""
    newest = sorted(steps)[-keep_last:] if keep_last > 0 else []
    permanent = [s for s in steps if keep_every > 0 and s % keep_every == 0]
    return sorted(set(newest) | set(permanent))


def convert_to_universal(tag_dir: Path) -> Path:
    """`<tag>/universal/<tag>/` in DeepSpeed's universal layout (made once; atomic via rename).

    Runs DeepSpeed's converter in a child process: it forks worker pools and holds every shard of
    the model in memory at once, which the training process should not pay for.
    """
    tag_dir = Path(tag_dir)
    final = tag_dir / UNIVERSAL_DIR
    if (final / tag_dir.name / "zero").is_dir():
        return final
    staging = tag_dir / f".{UNIVERSAL_DIR}.tmp"  # one converter at a time (rank 0)
    shutil.rmtree(staging, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(tag_dir),
        "--output_folder",
        str(staging / tag_dir.name),
        "--inject_missing_state",
    ]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["(no output)"]
        raise CheckpointError(
            f"converting {tag_dir} for a new world size failed ({tail[0]}); resume on the "
            f"world size it was saved with (see its COMPLETE file)"
        )
    _fsync_tree(staging)
    os.replace(staging, final)
    fsync_path(tag_dir)
    log.info("converted %s to a universal checkpoint in %.1f s", tag_dir, time.time() - started)
    return final


class CheckpointManager:
    """Every rank constructs one; `save`/`load` are collective (every rank calls them, same order)."""

    def __init__(self, output_dir: str, ckpt_cfg: CheckpointConfig, rank: int, world_size: int):
        check_checkpoint_config(ckpt_cfg)
        self.root = Path(output_dir) / "checkpoints"
        self.cfg = ckpt_cfg
        self.rank = rank
        self.world_size = world_size
        self.last_saved_step: int | None = None
        self.unconfirmed: Path | None = None  # a checkpoint of this run no step has run from yet
        self._checked: set = set()  # tag dirs whose pickles passed check_safe_to_load

    def due(self, step: int) -> bool:
        """A periodic save is due after optimizer step `step` (1-based count of steps done)."""
        return self.cfg.every_steps > 0 and step > 0 and step % self.cfg.every_steps == 0

    # --- save

    def save(self, engine, step: int, client_state: dict[str, Any]) -> str:
        """Collective. Writes tag `step_{step:08d}`; moves `latest` only once every rank has written."""
        tag_dir = self.root / tag_for_step(step)
        if self.last_saved_step == step:  # e.g. the final save right after a periodic one
            return str(tag_dir)
        common = {k: v for k, v in client_state.items() if k != "rng"}
        common["step"] = step
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # a leftover of a crashed save, or of an abandoned timeline
                _remove_tag_dir(tag_dir)
        _barrier(self.world_size)
        started = time.time()
        try:  # torch.save reports a full disk as "[enforce fail at inline_container.cc] unexpected pos"
            engine.save_checkpoint(
                str(self.root), tag=tag_dir.name, client_state={CLIENT_KEY: common}, save_latest=False
            )
            if "rng" in client_state:
                (tag_dir / "rng").mkdir(exist_ok=True)
                _atomic_torch_save(client_state["rng"], tag_dir / "rng" / f"rank_{self.rank:05d}.pt")
            _fsync_own_shards(tag_dir, self.rank)
        except (OSError, RuntimeError) as exc:
            full = disk_full_error(exc, tag_dir)
            if full is None:
                raise
            raise full from None
        _barrier(self.world_size)  # every rank's files are on disk (closed) past this point
        if self.rank == 0:
            self._commit(tag_dir, step, engine)
            log.info("saved checkpoint %s in %.1f s", tag_dir, time.time() - started)
        self.last_saved_step = step
        self.unconfirmed = tag_dir
        return str(tag_dir)

    def _commit(self, tag_dir: Path, step: int, engine) -> None:
        """Rank 0, after the barrier: make the files durable, mark complete, move `latest`, prune."""
        _fsync_tree(tag_dir, skip=_is_rank_shard)  # shared files (ZeRO-1/2 model states), dir entries
        record = {
            "step": step,
            "world_size": self.world_size,
            "zero_stage": _zero_stage(engine),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "healthy": True,
            "confirmed": False,
        }
        atomic_write_text(tag_dir / COMPLETE_FILE, json.dumps(record) + "\n")
        atomic_write_text(self.root / LATEST_FILE, tag_dir.name + "\n")
        self._prune(keep=tag_dir)

    def _prune(self, keep: Path) -> None:
        """Retention, only after `latest` names the new tag; incomplete leftovers and checkpoints marked
        unhealthy go too, but never the newest confirmed healthy one."""
        tags = list_tags(self.root)
        records = {step: read_complete(path) for step, path in tags}
        healthy = [s for s, _ in tags if is_healthy(records[s])]
        survivors = set(retained_steps(healthy, self.cfg.keep_last, self.cfg.keep_every))
        confirmed = [s for s, _ in tags if is_confirmed(records[s])]
        if confirmed:
            survivors.add(confirmed[-1])
        for step, path in tags:
            if path != keep and step not in survivors:
                _remove_tag_dir(path)

    def settle(self, healthy: bool, reason: str = "") -> None:
        """Confirm the newest checkpoint (and prune), or mark it unhealthy. Not collective: rank 0
        rewrites its COMPLETE, the others only forget it."""
        tag_dir, self.unconfirmed = self.unconfirmed, None
        if tag_dir is None or self.rank != 0:
            return
        record = read_complete(tag_dir)
        if record is None:
            return
        if healthy:
            record["confirmed"] = True
        else:
            record.update(healthy=False, unhealthy_reason=reason)
            log.warning("checkpoint %s marked unhealthy: %s", tag_dir, reason)
        atomic_write_text(tag_dir / COMPLETE_FILE, json.dumps(record) + "\n")
        if healthy:
            self._prune(keep=tag_dir)

    # --- resume

    def find_resume(self, resume: str) -> str | None:
        """ "none" -> None; "auto" -> newest complete checkpoint of this output dir (None if there is none);
        a path -> that checkpoint (a tag dir, a `checkpoints` dir or a run's output dir).

        A path from another run only seeds a fresh output dir: once this run has a checkpoint of its
        own, that one wins, so a requeued job (same command line) continues instead of starting over."""
        if resume == "none":
            return None
        own = newest_complete(self.root)
        if resume == "auto":
            return str(own) if own else None
        found = resolve_checkpoint_path(Path(resume))
        if own is not None and found.parent.resolve() != self.root.resolve():
            if self.rank == 0:
                log.info("resume: %s has its own checkpoint %s; it wins over --resume %s", self.root, own, resume)
            return str(own)
        return str(found)

    def prepare_resume(self, path: str | None) -> bool:
        """Collective, before the engine is built. True when `path` was saved by another number of
        ranks: rank 0 has converted it to DeepSpeed's universal format, and the engine must be built
        with `"checkpoint": {"load_universal": true}` in its DeepSpeed config to load it."""
        if not path:
            return False
        tag_dir = Path(path)
        saved_world = int(self._complete_record(tag_dir)["world_size"])
        self._check_safe(tag_dir)  # also an `auto` resume's dir, and before the universal conversion
        if saved_world == self.world_size:
            return False
        self._convert_on_rank0(tag_dir, saved_world)
        return True

    @staticmethod
    def _complete_record(tag_dir: Path) -> dict[str, Any]:
        record = read_complete(tag_dir)
        if record is None:
            raise CheckpointError(
                f"{tag_dir} has no COMPLETE marker (its save never finished); "
                f"resume from an earlier checkpoint or use --resume auto"
            )
        return record

    def load(self, engine, path: str) -> dict[str, Any]:
        """Collective. Restores DeepSpeed state; returns client_state with this rank's `rng` (None when
        the world size changed: per-rank streams do not map onto a different number of ranks)."""
        tag_dir = Path(path)
        record = self._complete_record(tag_dir)
        self._check_safe(tag_dir)  # callers that skip prepare_resume (eval) are checked here
        saved_world = int(record["world_size"])
        load_dir = str(tag_dir.parent)
        if saved_world != self.world_size:
            if not engine.load_universal_checkpoint():
                raise CheckpointError(
                    f"{tag_dir} was saved by {saved_world} ranks; to load it on {self.world_size}, "
                    f"call prepare_resume() before building the engine and set "
                    f"checkpoint.load_universal in its DeepSpeed config"
                )
            load_dir = str(tag_dir / UNIVERSAL_DIR)
        loaded, client_state = engine.load_checkpoint(
            load_dir,
            tag=tag_dir.name,
            load_module_strict=True,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        client_state = client_state or {}
        if loaded is None:
            raise CheckpointError(
                f"DeepSpeed found no checkpoint files in {tag_dir}; it is damaged, resume from another checkpoint"
            )
        if CLIENT_KEY not in client_state:
            raise CheckpointError(
                f"{tag_dir} was not written by eva-train (no {CLIENT_KEY}); "
                f"start from its weights with --model.init_from instead"
            )
        client_state = dict(client_state[CLIENT_KEY])
        client_state["rng"] = self._load_rng(tag_dir) if saved_world == self.world_size else None
        if self.rank == 0:
            self._set_aside_newer(tag_dir, int(record["step"]))
        _barrier(self.world_size)
        self.last_saved_step = int(record["step"])
        own = tag_dir.parent.resolve() == self.root.resolve()  # never rewrite another run's checkpoint
        self.unconfirmed = tag_dir if own and not is_confirmed(record) else None
        return client_state

    def _check_safe(self, tag_dir: Path) -> None:
        if tag_dir.resolve() not in self._checked:
            check_safe_to_load(tag_dir)
            self._checked.add(tag_dir.resolve())

    def _convert_on_rank0(self, tag_dir: Path, saved_world: int) -> None:
        """Rank 0 converts; its failure is raised on every rank (no rank left waiting in a barrier)."""
        error = [""]
        if self.rank == 0:
            log.info(
                "checkpoint %s was saved by %d ranks, loading on %d: resharding", tag_dir, saved_world, self.world_size
            )
            try:
                convert_to_universal(tag_dir)
            except CheckpointError as exc:
                error[0] = str(exc)
        if self.world_size > 1:
            dist.broadcast_object_list(error, src=0)
        if error[0]:
            raise CheckpointError(error[0])

    def _load_rng(self, tag_dir: Path) -> dict[str, Any] | None:
        path = tag_dir / "rng" / f"rank_{self.rank:05d}.pt"
        if not path.exists():
            return None
        try:  # tensors and plain types (weights_only=True): never runs code from the file
            return load_rng_file(path)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None

    def _set_aside_newer(self, tag_dir: Path, step: int) -> None:
        """Resuming this output dir from an older step: checkpoints of the abandoned, later timeline
        would win a later `auto` resume and retention, so rename them out of the tag pattern."""
        if tag_dir.parent.resolve() != self.root.resolve():
            return
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        for later_step, path in list_tags(self.root):
            if later_step > step and read_complete(path) is None:
                _remove_tag_dir(path)  # a save that never finished: nothing to keep
            elif later_step > step:
                aside = path.with_name(f"{path.name}.abandoned-{stamp}")
                os.replace(path, aside)
                log.warning("resumed from step %d: set aside later checkpoint %s as %s", step, path, aside)
        latest = self.root / LATEST_FILE
        if latest.exists() and latest.read_text().strip() != tag_dir.name:
            atomic_write_text(latest, tag_dir.name + "\n")


def newest_complete(ckpt_root: Path) -> Path | None:
    """`latest` when it names a complete checkpoint; otherwise the highest complete step (a kill
    between COMPLETE and the `latest` rename, or a lost `latest`)."""
    latest = ckpt_root / LATEST_FILE
    if latest.is_file():
        named = ckpt_root / latest.read_text().strip()
        if step_of_tag(named.name) is not None and is_healthy(read_complete(named)):
            return named
    return newest_healthy(ckpt_root)


def newest_healthy(ckpt_root: Path, before_step: int | None = None) -> Path | None:
    """The highest complete checkpoint not marked unhealthy (with step < before_step when given)."""
    found = [
        p for s, p in list_tags(ckpt_root) if is_healthy(read_complete(p)) and (before_step is None or s < before_step)
    ]
    return found[-1] if found else None


def resolve_checkpoint_path(path: Path) -> Path:
    """A tag dir as is; an output dir or its `checkpoints/` -> its newest complete checkpoint."""
    if not path.exists():
        raise CheckpointError(
            f"resume path '{path}' does not exist; pass a checkpoint dir "
            f"(OUT/checkpoints/step_XXXXXXXX), a run's output dir, auto or none"
        )
    if read_complete(path) is not None:
        return path
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    found = newest_complete(path)
    if found is None:
        raise CheckpointError(
            f"'{path}' holds no complete checkpoint (no dir with a COMPLETE marker); "
            f"pass another path, or --resume none to start fresh"
        )
    return found


def _zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage") else 0
