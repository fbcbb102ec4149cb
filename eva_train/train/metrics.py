"""Per-step training metrics: timing (images/s, data-wait fraction), MFU from analytic FLOPs, and the
sinks: metrics.jsonl (rank 0, appended), wandb (offline unless credentials; never fatal), tqdm.

wandb: one run per output dir for its whole life. Its id is kept in OUT/wandb_id, so every launch
(requeue, kill + resume, another world size) continues the same run; the x-axis is our training
`step` (a logged metric), not wandb's own counter, so steps a resumed run logs again after a kill
land where they belong instead of being dropped as "not monotonic"."""

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import torch

from eva_train.plan.gpus import mfu, peak_flops  # noqa: F401 - peak_flops re-exported: the one GPU table
from eva_train.runtime.fsio import atomic_write_text

log = logging.getLogger(__name__)


def memory_gib(device) -> float:
    """Peak allocated accelerator memory, or this process's resident memory on CPU."""
    if getattr(device, "type", "cpu") == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return psutil.Process().memory_info().rss / 2**30


class ThroughputMeter:
    """Accumulates step and data-wait time between two log points."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.data_wait_s, self.images, self.steps = time.perf_counter(), 0.0, 0, 0

    def add(self, images: int, data_wait_s: float) -> None:
        self.images += images
        self.data_wait_s += data_wait_s
        self.steps += 1

    def read(self, flops_per_image: float, peak_flops_per_device: float | None, world_size: int) -> dict[str, Any]:
        elapsed_s = max(time.perf_counter() - self.start, 1e-9)
        images_per_sec = self.images / elapsed_s
        utilisation = (
            mfu(flops_per_image, images_per_sec, world_size, peak_flops_per_device) if peak_flops_per_device else None
        )  # unknown devices (and CPUs) give mfu = null
        return {
            "images_per_sec": images_per_sec,
            "mfu": utilisation,
            "data_wait_frac": self.data_wait_s / elapsed_s,
            "step_time_s": elapsed_s / max(1, self.steps),
        }


def trim_after(path: Path, step: int) -> None:
    """Move the lines of steps after `step` (a killed run logged them past its last checkpoint; the
    resumed run logs them again) and a torn last line to metrics.abandoned.jsonl; atomic rewrite."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    past = [_step_of(line) > step for line in lines]
    if not any(past):
        return
    with open(path.with_name("metrics.abandoned.jsonl"), "a") as f:
        f.write("".join(line + "\n" for line, is_past in zip(lines, past) if is_past))
    kept = [line for line, is_past in zip(lines, past) if not is_past]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    log.info(
        "%s: %d lines after step %d (logged after the checkpoint this run starts from) moved to %s",
        path,
        len(lines) - len(kept),
        step,
        path.with_name("metrics.abandoned.jsonl"),
    )


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except ValueError:  # the torn last line of a killed run
        return float("inf")


class MetricsSink:
    """Where logged metrics go. Rank 0 writes; other ranks hold a sink that does nothing."""

    def __init__(
        self, output_dir: str, logging_cfg, run_config: dict[str, Any], rank: int, total_steps: int, start_step: int
    ):
        self.enabled = rank == 0
        self.path = Path(output_dir) / "metrics.jsonl"
        self.wandb_run = None
        self.bar = None
        if not self.enabled:
            return
        trim_after(self.path, start_step)
        with open(self.path.with_name("launches.jsonl"), "a") as f:  # resumes are marked on the plots
            f.write(json.dumps({"step": start_step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        if logging_cfg.wandb:
            self.wandb_run = _start_wandb(output_dir, logging_cfg, run_config)
        if logging_cfg.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:  # one whole line per write: a kill leaves at most a torn last line
            f.write(json.dumps(record) + "\n")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", lr=f"{record.get('lr', 0):.2e}")
        if self.wandb_run is not None:
            try:
                self.wandb_run.log({k: v for k, v in record.items() if v is not None})
            except Exception as error:  # a logging service must never stop training
                log.warning("wandb log failed (%s); continuing without wandb", error)
                self.wandb_run = None

    def close(self) -> None:
        """Before the process may be killed (a requeue ends the job at once): flush and stop wandb's
        service, which would otherwise die mid-stream and fill the job's log with tracebacks."""
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
                import wandb

                wandb.teardown()
            except Exception as error:
                log.warning("wandb finish failed: %s", error)
            self.wandb_run = None


def wandb_mode(environ=os.environ) -> str:
    """online only with an API key and WANDB_MODE not forcing offline/disabled."""
    requested = environ.get("WANDB_MODE", "")
    if requested in ("offline", "disabled", "dryrun"):
        return "offline" if requested == "dryrun" else requested
    return "online" if environ.get("WANDB_API_KEY") else "offline"


WANDB_ID_FILE = "wandb_id"
WANDB_INIT_TIMEOUT_S = 30  # online only: then the run goes on offline (same id, `wandb sync` later)


def wandb_run_id(output_dir: str) -> str:
    """The output dir's wandb run id: read from OUT/wandb_id, or made once and written atomically."""
    path = Path(output_dir) / WANDB_ID_FILE
    if path.exists():
        run_id = path.read_text().strip()
        if run_id:
            return run_id
    run_id = uuid.uuid4().hex[:16]
    atomic_write_text(path, run_id + "\n")
    return run_id


def _start_wandb(output_dir: str, logging_cfg, run_config: dict[str, Any]):
    try:
        import wandb  # optional, and seconds to import: only when logging.wandb is on
    except ImportError as error:
        log.warning("wandb unavailable (%s); logging to metrics.jsonl only", error)
        return None
    run_id = wandb_run_id(output_dir)
    mode = wandb_mode()
    for attempt_mode in [mode, "offline"] if mode == "online" else [mode]:
        try:
            run = wandb.init(
                project=logging_cfg.wandb_project,
                name=logging_cfg.run_name or None,
                dir=output_dir,
                config=run_config,
                mode=attempt_mode,
                id=run_id,
                resume="allow",
                settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S, silent=True),
            )
        except Exception as error:
            log.warning("wandb init (%s) failed (%s)", attempt_mode, error)
            continue
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        return run
    log.warning("wandb unavailable; logging to metrics.jsonl only")
    return None
