"""The training loop of pretrain.py: build every piece (after config checks passed), resume, run steps
with logging, validation, kNN monitoring, checkpoints, preemption and a stall watchdog."""

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import deepspeed
import torch

import eva_kernels
from eva_train.config import Config, derived_grad_accum
from eva_train.data.demo import ensure_demo_data
from eva_train.data.loader import SignalSafeLoader, build_loader
from eva_train.data.masking import scaled_patch_count
from eva_train.data.sampler import ResumableSampler
from eva_train.eval.demo_report import final_report
from eva_train.eval.knn_monitor import KnnMonitor
from eva_train.models.flops import train_flops_per_image
from eva_train.models.teacher import build_teacher
from eva_train.models.variants import VARIANTS
from eva_train.optim.schedule import lr_at_step, recipe_steps
from eva_train.plan.gpus import peak_flops
from eva_train.runtime.checkpoint import CheckpointManager
from eva_train.runtime.distributed import WorldInfo, init_process_group
from eva_train.runtime.fsio import atomic_write_text
from eva_train.train.engine import Trainer, build_ds_config, build_engine
from eva_train.train.loop import run_loop
from eva_train.train.metrics import MetricsSink
from eva_train.train.plots import draw_run_plots_safely
from eva_train.train.preemption import PreemptionHandler, slurm_job_summary
from eva_train.train.watchdog import SAVE_TIMEOUT_S, StallWatchdog

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything one training process runs with, built once by `build_run`; the loop reads it."""

    cfg: Config
    world: WorldInfo
    device: torch.device
    trainer: Trainer
    engine: "deepspeed.DeepSpeedEngine"
    loader: SignalSafeLoader
    sampler: ResumableSampler
    ckpt: CheckpointManager
    total_steps: int
    start_step: int
    warmup_steps: int
    flops_per_image: float
    peak_flops: float | None
    ds_config: dict[str, Any]
    kernels: dict[str, Any]  # backend, Triton version, the self-check's verdicts (config.json)
    val_loader: SignalSafeLoader | None = None
    knn: KnnMonitor | None = None
    client_rng: dict | None = None  # RNG state of the checkpoint resumed from
    health: dict | None = None  # the divergence guard's state in that checkpoint
    bad_samples: tuple[int, int] = (0, 0)  # (replaced, seen) by the run this one resumes
    grad_accum: int = 1
    code_version: str = ""


def prepare_data(cfg: Config) -> None:
    """The demo generates its data on first use (every rank may call: a file lock serializes them)."""
    if cfg.data.index or not cfg.data.demo_root:
        return
    train_index, val_index = ensure_demo_data(cfg.data.demo_root, img_size=cfg.model.img_size)
    cfg.data.index = [train_index]
    cfg.data.val_index = cfg.data.val_index or [val_index]
    if cfg.eval.knn_every_steps > 0 and not cfg.eval.knn_train_index:
        cfg.eval.knn_train_index, cfg.eval.knn_val_index = [train_index], [val_index]


def _loader(cfg: Config, world: WorldInfo, paths, train: bool, sampler_state=None):
    return build_loader(
        cfg.data,
        cfg.mask,
        index_paths=paths,
        img_size=cfg.model.img_size,
        patch_size=VARIANTS[cfg.model.variant].patch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        rank=world.rank,
        world_size=world.world_size,
        seed=cfg.train.seed,
        train=train,
        sampler_state=sampler_state,
    )


def _flops_per_image(cfg: Config, teacher) -> float:
    grid = cfg.model.img_size // VARIANTS[cfg.model.variant].patch_size
    num_masked = scaled_patch_count(cfg.mask.num_masking_patches, (grid, grid))
    return train_flops_per_image(cfg.model, teacher.forward_flops_per_image(), teacher.out_dim, num_masked)


def _knn_monitor(cfg: Config, world: WorldInfo) -> KnnMonitor | None:
    if cfg.eval.knn_every_steps <= 0:
        return None
    return KnnMonitor(
        cfg.eval, cfg.model.img_size, VARIANTS[cfg.model.variant].patch_size, world.rank, world.world_size
    )


PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _autotune_kernels(cfg: Config, grid: int, device: torch.device) -> dict:
    """On a GPU, every rank checks our Triton kernels at this run's shapes against the PyTorch references and
    times both (one collective: all ranks take the same path); `auto` keeps ours only where correct and faster.
    Shapes not covered here (e.g. MAE's visible-token encoder) take the PyTorch path under torch.distributed."""
    if device.type != "cuda" and eva_kernels.backend() != "triton":  # CPU: auto takes PyTorch, nothing to check
        return {}
    variant = VARIANTS[cfg.model.variant]
    norm_widths = [variant.mlp_hidden_dim] if variant.sub_ln else []
    shapes = eva_kernels.vit_shapes(
        cfg.train.micro_batch_size,
        grid * grid + 1,
        variant.embed_dim,
        variant.num_heads,
        PRECISION_DTYPES[cfg.train.precision],
        rope=variant.rope,
        extra_norm_widths=norm_widths,
        device=device.type,
    )
    return eva_kernels.autotune(shapes)["kernels"]


def build_run(cfg: Config, world: WorldInfo, code_version: str) -> Run:
    prepare_data(cfg)
    Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
    eva_kernels.set_backend(cfg.model.kernels or None)
    device = init_process_group(world, cfg.train.dist_timeout_s)
    ds_config = build_ds_config(cfg, world.world_size)
    grid = cfg.model.img_size // VARIANTS[cfg.model.variant].patch_size
    kernel_decisions = _autotune_kernels(cfg, grid, device)
    teacher = build_teacher(cfg.teacher, grid, device)  # outside the engine: frozen, never partitioned
    ckpt = CheckpointManager(cfg.train.output_dir, cfg.checkpoint, world.rank, world.world_size)
    resume_path = ckpt.find_resume(cfg.checkpoint.resume)
    if ckpt.prepare_resume(resume_path):  # saved by another number of ranks: DeepSpeed's universal loader
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    # model.init_from starts a run; a resumed run continues from its checkpoint instead
    engine, optimizer = build_engine(
        cfg, ds_config, teacher.out_dim, device, "" if resume_path else cfg.model.init_from
    )
    torch.manual_seed(cfg.train.seed * 1_000_003 + world.rank + 1)  # per-rank drop-path streams
    client = ckpt.load(engine, resume_path) if resume_path else {}
    if resume_path:
        log.info("resumed from %s at step %d", resume_path, client["step"])
    loader, sampler = _loader(cfg, world, cfg.data.index, True, client.get("sampler_state"))
    val_loader = _loader(cfg, world, cfg.data.val_index, False)[0] if cfg.data.val_index else None
    total, warmup = recipe_steps(cfg, sampler.epoch_length)
    lr_fn = partial(lr_at_step, peak_lr=cfg.optim.lr, min_lr=cfg.optim.min_lr, warmup_steps=warmup, total_steps=total)
    trainer = Trainer(engine, teacher, optimizer, device, cfg.train.precision, lr_fn)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return Run(
        cfg=cfg,
        world=world,
        device=device,
        trainer=trainer,
        engine=engine,
        loader=loader,
        sampler=sampler,
        ckpt=ckpt,
        total_steps=total,
        start_step=int(client.get("step", 0)),
        warmup_steps=warmup,
        flops_per_image=_flops_per_image(cfg, teacher),
        peak_flops=peak_flops(device_name, cfg.train.precision),
        ds_config=ds_config,
        kernels={**eva_kernels.describe(), "selfcheck": kernel_decisions},
        val_loader=val_loader,
        knn=_knn_monitor(cfg, world),
        client_rng=client.get("rng"),
        health=client.get("health"),
        bad_samples=tuple(client.get("bad_samples", (0, 0))),
        grad_accum=derived_grad_accum(cfg, world.world_size),
        code_version=code_version,
    )


def write_run_config(run: Run) -> None:
    """OUT/config.json (rank 0, atomic): the resolved config plus how this process ran it."""
    if run.world.rank != 0:
        return
    record = run.cfg.to_dict()
    record["run"] = {
        "world_size": run.world.world_size,
        "gradient_accumulation_steps": run.grad_accum,
        "total_steps": run.total_steps,
        "warmup_steps": run.warmup_steps,
        "kernels": run.kernels,
        "code_version": run.code_version,
        "deepspeed": run.ds_config,
        "device": str(run.device),
    }
    atomic_write_text(Path(run.cfg.train.output_dir) / "config.json", json.dumps(record, indent=2))


def train(cfg: Config, world: WorldInfo, code_version: str) -> int:
    """Build, resume, loop; 0 when finished or cleanly stopped (preemption, max_steps_this_run), 1 when
    the divergence guard stopped the run."""
    # before the slow build: a signal then still ends cleanly; never uninstalled, so a late signal is only recorded
    preemption = PreemptionHandler(cfg.train.save_signals).install()
    watchdog = StallWatchdog(cfg.train.stall_timeout_s, world.rank).start()
    watchdog.beat("build", timeout_s=max(cfg.train.stall_timeout_s, SAVE_TIMEOUT_S))
    try:
        run = build_run(cfg, world, code_version)
        write_run_config(run)
        if slurm_job_summary():
            log.info(slurm_job_summary())  # which job, which restart, which task: the requeue history in the log
    except BaseException:  # e.g. a teacher file that broke after the start-up check: pretrain.main says it
        watchdog.stop()  # in one line; the watchdog must not dump stacks meanwhile
        raise
    sink = MetricsSink(cfg.train.output_dir, cfg.logging, cfg.to_dict(), world.rank, run.total_steps, run.start_step)
    try:
        outcome, last_step = run_loop(run, sink, preemption, watchdog)
        if outcome == "finished":
            _final_report(run)
    finally:
        sink.close()
        watchdog.stop()
        if world.rank == 0:
            draw_run_plots_safely(cfg.train.output_dir)
    log.info("run %s at step %s", outcome, last_step)
    deepspeed.comm.barrier()
    if outcome == "preempted" and world.rank == 0:
        preemption.requeue()  # last: SLURM kills the job at once, so logs and wandb are closed by now
    preemption.ignore_from_now()  # a signal from here on must not kill the rank while it exits
    return 1 if outcome == "diverged" else 0  # diverged: the loop logged the one-line reason on rank 0


def _final_report(run: Run) -> None:
    if not run.cfg.eval.final_report:
        return
    e, d = run.cfg.eval, run.cfg.data
    if not ((e.knn_train_index and e.knn_val_index) or (d.index and d.val_index)):
        # checked here, not at start-up: a training run must not die at its end over a report
        log.warning(
            "eval.final_report skipped: it needs a labeled train/val pair (eval.knn_train_index and "
            "eval.knn_val_index, or data.val_index)"
        )
        return
    final_report(run.cfg, run.engine.module, rank=run.world.rank, world_size=run.world.world_size)
