"""Who am I in the job: RANK/LOCAL_RANK/WORLD_SIZE from the launcher (deepspeed, torchrun, srun),
and the process group. DeepSpeed reads no SLURM_* variables, so they are mapped here."""

import datetime
import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass

SLURM_FALLBACK = {"RANK": "SLURM_PROCID", "LOCAL_RANK": "SLURM_LOCALID", "WORLD_SIZE": "SLURM_NTASKS"}


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    local_rank: int
    world_size: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_from_env(environ: MutableMapping[str, str] = os.environ) -> WorldInfo:
    """Fill RANK/LOCAL_RANK/WORLD_SIZE (from SLURM_* if missing; a lone process is rank 0 of 1) in
    `environ` and return them. A lone process also gets a local MASTER_ADDR/PORT, so DeepSpeed
    does not go looking for MPI."""
    for name, slurm_name in SLURM_FALLBACK.items():
        if name not in environ and slurm_name in environ:
            environ[name] = environ[slurm_name]
    environ.setdefault("RANK", "0")
    environ.setdefault("LOCAL_RANK", "0")
    environ.setdefault("WORLD_SIZE", "1")
    info = WorldInfo(int(environ["RANK"]), int(environ["LOCAL_RANK"]), int(environ["WORLD_SIZE"]))
    if not 0 <= info.rank < info.world_size:
        raise ValueError(f"RANK={info.rank} is outside WORLD_SIZE={info.world_size}; fix the launcher's environment")
    if info.world_size == 1:
        environ.setdefault("MASTER_ADDR", "127.0.0.1")
        environ.setdefault("MASTER_PORT", str(_free_port()))
    elif "MASTER_ADDR" not in environ or "MASTER_PORT" not in environ:
        raise ValueError(
            "WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set; launch with `deepspeed`, "
            "torchrun or slurm/*.sh (which export them)"
        )
    return info


def init_process_group(world: WorldInfo, timeout_s: int):
    """Create the process group (NCCL on GPUs, gloo on DeepSpeed's CPU accelerator); returns this rank's device."""
    # imported here: pretrain.py reads world_from_env before validating, and deepspeed takes seconds to import
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cuda":
        accelerator.set_device(world.local_rank)
    deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s))
    if accelerator.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(accelerator.device_name(world.local_rank))
