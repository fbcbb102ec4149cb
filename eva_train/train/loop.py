"""The step loop: data -> step -> (val, kNN) -> log -> checkpoint -> preemption, deterministic across resume."""
import logging
import time
from typing import Any, Dict, List

import torch

from eva_train.train.metrics import ThroughputMeter, memory_gib

log = logging.getLogger(__name__)


def _next_micro_batches(run, batches) -> List[Dict[str, torch.Tensor]]:
    return [next(batches) for _ in range(run.grad_accum)]


def _bad_sample_counts(micro_batches, device) -> torch.Tensor:
    bad = sum(int(b["bad"].sum()) for b in micro_batches)
    seen = sum(int(b["images"].shape[0]) for b in micro_batches)
    return torch.tensor([bad, seen], dtype=torch.int64, device=device)


def _global_sum(tensor: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def client_state(run, step: int, monitor) -> Dict[str, Any]:
    from eva_train.runtime.rng import capture_rng_state

    consumed_this_run = (step - run.start_step) * run.cfg.train.global_batch_size
    return {"step": step, "samples_seen": step * run.cfg.train.global_batch_size,
            "bad_samples": [monitor.bad_samples, monitor.seen_samples],  # whole run, all ranks
            "sampler_state": run.sampler.state_after(consumed_this_run), "rng": capture_rng_state(),
            "config": run.cfg.to_dict(), "code_version": run.code_version}


def _evaluations(run, step: int) -> Dict[str, float]:
    """val loss / kNN numbers due after `step` (same decision on every rank: collectives inside)."""
    out = {}
    every = run.cfg.train.val_every_steps
    if run.val_loader is not None and ((every > 0 and step % every == 0) or step == run.total_steps):
        out["val_loss"] = run.trainer.val_loss(run.val_loader)
    if run.knn is not None and run.knn.due(step):
        out.update(run.knn.run(run.engine.module))
    return out


def _record(run, step: int, result, meter: ThroughputMeter, bad_samples: int) -> Dict[str, Any]:
    samples_seen = step * run.cfg.train.global_batch_size
    record = {"step": step, "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm}
    record.update(meter.read(run.flops_per_image, run.peak_flops, run.world.world_size))
    record.update({"epoch": samples_seen / run.sampler.epoch_length, "bad_samples": bad_samples,
                   "samples_seen": samples_seen, "memory_gib": round(memory_gib(run.device), 3)})
    return record


def _save(run, step: int, watchdog, monitor) -> None:
    from eva_train.train.build import SAVE_TIMEOUT_S

    watchdog.beat(f"save step {step}", timeout_s=SAVE_TIMEOUT_S)
    run.ckpt.save(run.engine, step, client_state(run, step, monitor))


def _stop_reason(run, step: int, preempted: bool) -> str:
    if step >= run.total_steps:  # first: a signal that lands on the last step must not requeue a finished run
        return "finished"
    if preempted:
        return "preempted"
    limit = run.cfg.train.max_steps_this_run
    return "max_steps" if limit > 0 and step - run.start_step >= limit else ""


def run_loop(run, sink, preemption, watchdog) -> str:
    """Steps start_step..total_steps-1; returns finished / preempted / max_steps."""
    from eva_train.data import BadSampleMonitor
    from eva_train.runtime.rng import restore_rng_state

    batches = iter(run.loader)  # before the RNG restore: creating the iterator draws from torch's RNG
    if run.client_rng is not None:
        restore_rng_state(run.client_rng)
    monitor = BadSampleMonitor(run.cfg.data.bad_sample_threshold, run.cfg.data.bad_sample_min_count, *run.bad_samples)
    meter = ThroughputMeter()
    run.engine.train()
    reason, step = _stop_reason(run, run.start_step, False), run.start_step
    while not reason:
        watchdog.beat(f"data step {step}")
        waited_from = time.perf_counter()
        micro_batches = _next_micro_batches(run, batches)
        data_wait_s = time.perf_counter() - waited_from
        watchdog.beat(f"train step {step}")
        result = run.trainer.train_step(step, micro_batches)
        step += 1
        counts = _global_sum(_bad_sample_counts(micro_batches, run.device)).cpu()
        monitor.update(int(counts[0]), int(counts[1]))  # global counts: every rank aborts together
        meter.add(run.cfg.train.global_batch_size, data_wait_s)
        sink.advance()
        evaluations = _evaluations(run, step)
        reason = _stop_reason(run, step, preemption.agree(run.device))
        if step % run.cfg.logging.log_every_steps == 0 or evaluations or reason:
            sink.write({**_record(run, step, result, meter, monitor.bad_samples), **evaluations})
            meter.reset()
        if run.ckpt.due(step) or reason:
            _save(run, step, watchdog, monitor)
    run.extras["last_step"] = step
    return reason
