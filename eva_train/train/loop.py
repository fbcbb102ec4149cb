"""The step loop: data -> step -> (val, kNN) -> log -> checkpoint -> preemption, deterministic across resume."""

import logging
import time
from typing import Any

import torch
import torch.distributed as dist

from eva_train.data import BadSampleMonitor
from eva_train.runtime.checkpoint import newest_healthy
from eva_train.runtime.rng import capture_rng_state, restore_rng_state
from eva_train.train.health import DivergenceGuard, Verdict
from eva_train.train.metrics import ThroughputMeter, memory_gib, trim_after
from eva_train.train.watchdog import SAVE_TIMEOUT_S

log = logging.getLogger(__name__)


def _next_micro_batches(run, batches) -> list[dict[str, torch.Tensor]]:
    return [next(batches) for _ in range(run.grad_accum)]


def client_state(run, step: int, monitor, guard: DivergenceGuard | None = None) -> dict[str, Any]:
    consumed_this_run = (step - run.start_step) * run.cfg.train.global_batch_size
    return {
        "step": step,
        "samples_seen": step * run.cfg.train.global_batch_size,
        "bad_samples": [monitor.bad_samples, monitor.seen_samples],  # whole run, all ranks
        "sampler_state": run.sampler.state_after(consumed_this_run),
        "rng": capture_rng_state(),
        "config": run.cfg.to_dict(),
        "code_version": run.code_version,
        "health": guard.state_dict() if guard is not None else {},
    }


def _evaluations(run, step: int) -> dict[str, float]:
    """val loss / kNN numbers due after `step` (same decision on every rank: collectives inside)."""
    out = {}
    every = run.cfg.train.val_every_steps
    if run.val_loader is not None and ((every > 0 and step % every == 0) or step == run.total_steps):
        out["val_loss"] = run.trainer.val_loss(run.val_loader)
    if run.knn is not None and run.knn.due(step):
        out.update(run.knn.run(run.engine.module))
    return out


def _record(run, step: int, result, meter: ThroughputMeter, bad_samples: int, guard) -> dict[str, Any]:
    samples_seen = step * run.cfg.train.global_batch_size
    record = {"step": step, "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm}
    record.update(meter.read(run.flops_per_image, run.peak_flops, run.world.world_size))
    record.update(
        {
            "epoch": samples_seen / run.sampler.epoch_length,
            "bad_samples": bad_samples,
            "samples_seen": samples_seen,
            "memory_gib": round(memory_gib(run.device), 3),
            "skipped_steps": guard.skipped_steps,
            "spike_reloads": guard.spike_reloads,
            "skipped_samples": run.sampler.skipped_before + run.sampler.skipped,
        }
    )
    return record


def _save(run, step: int, watchdog, monitor, guard) -> None:

    if not guard.may_save():  # never from non-finite or spiking state: the last checkpoint stays the resume point
        if run.world.rank == 0:
            log.warning("not saving at step %d: steps since %d were non-finite or spiking", step, guard.streak_start)
        return
    watchdog.beat(f"save step {step}", timeout_s=SAVE_TIMEOUT_S)
    run.ckpt.save(run.engine, step, client_state(run, step, monitor, guard))


def _settle_checkpoint(run, step: int, verdict: Verdict, guard: DivergenceGuard) -> None:
    """The first applied finite step after the newest checkpoint confirms it (skipped steps leave its
    weights as they were, so that step ran from them); a divergence stop before any marks it unhealthy."""
    if run.ckpt.unconfirmed is None:
        return
    if not verdict.bad and not verdict.skipped:
        run.ckpt.settle(True)
    elif verdict.action == "stop":
        run.ckpt.settle(False, f"every step run from its weights ({guard.streak_start}-{step}) was non-finite")


def _divergence_message(run, step: int, guard: DivergenceGuard, result) -> str:
    first = guard.streak_start
    healthy = newest_healthy(run.ckpt.root)
    advice = (
        f"newest healthy checkpoint: {healthy}; resume from it (--resume {healthy}) with a lower --optim.lr "
        f"or after checking the data"
        if healthy
        else "no healthy checkpoint was written; start again with a lower --optim.lr"
    )
    return (
        f"training diverged: {guard.bad_streak} consecutive non-finite steps ({first}-{step}, last loss "
        f"{result.loss}, grad norm {result.grad_norm}; train.max_bad_steps={guard.max_bad_steps}); "
        f"stopped without saving; {advice}"
    )


def _reload_target(run, spike_start: int) -> str | None:
    """Rank 0 picks, every rank gets the same answer: the newest healthy checkpoint older than the
    weights the first spike step ran from (those may be the cause)."""
    found = [None]
    if run.world.rank == 0:
        path = newest_healthy(run.ckpt.root, before_step=spike_start - 1)
        found[0] = str(path) if path else None
    if run.world.world_size > 1:
        dist.broadcast_object_list(found, src=0)
    return found[0]


def _reload_after_spike(run, step: int, guard: DivergenceGuard, sink, watchdog, batches):
    """Collective. (step to continue from, batch iterator) after loading the last good checkpoint and
    skipping the samples consumed since it; unchanged when there is none."""
    spike_start = guard.streak_start
    guard.spike_handled()
    target = _reload_target(run, spike_start)
    if target is None:
        if run.world.rank == 0:
            log.warning("loss spike at steps %d-%d but no healthy checkpoint before it; continuing", spike_start, step)
        return step, batches
    watchdog.beat(f"spike reload at step {step}", timeout_s=SAVE_TIMEOUT_S)
    client = run.ckpt.load(run.engine, target)
    back_to, client_rng = int(client["step"]), client.get("rng")
    batch = run.cfg.train.global_batch_size
    state = run.sampler.skip((step - back_to) * batch, (back_to - run.start_step) * batch)
    batches = iter(run.loader)  # before the RNG restore, as at start-up
    if client_rng is not None:
        restore_rng_state(client_rng)
    if sink.enabled:
        trim_after(sink.path, back_to)  # the abandoned steps' lines go to metrics.abandoned.jsonl
    if run.world.rank == 0:
        log.warning(
            "loss spike at steps %d-%d (train.spike_factor=%g): reloaded %s and skipped the %d samples "
            "used since it (sampler now at epoch %d position %d)",
            spike_start,
            step,
            run.cfg.train.spike_factor,
            target,
            (step - back_to) * batch,
            state["epoch"],
            state["position"],
        )
    return back_to, batches


def _stop_reason(run, step: int, preempted: bool) -> str:
    if step >= run.total_steps:  # first: a signal that lands on the last step must not requeue a finished run
        return "finished"
    if preempted:
        return "preempted"
    limit = run.cfg.train.max_steps_this_run
    return "max_steps" if limit > 0 and step - run.start_step >= limit else ""


def run_loop(run, sink, preemption, watchdog) -> tuple[str, int]:
    """Steps start_step..total_steps-1; returns (finished / preempted / max_steps / diverged (nothing saved), the
    last step taken)."""
    batches = iter(run.loader)  # before the RNG restore: creating the iterator draws from torch's RNG
    if run.client_rng is not None:
        restore_rng_state(run.client_rng)
    monitor = BadSampleMonitor(run.cfg.data.bad_sample_threshold, run.cfg.data.bad_sample_min_count, *run.bad_samples)
    guard = DivergenceGuard(run.cfg.train, run.health)
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
        verdict = guard.observe(step, result.loss, result.loss_finite, result.grads_finite, result.loss_scale)
        _settle_checkpoint(run, step, verdict, guard)
        monitor.update(result.bad_samples, result.seen_samples)  # global counts: every rank aborts together
        meter.add(run.cfg.train.global_batch_size, data_wait_s)
        sink.advance()
        if verdict.skipped and run.world.rank == 0:
            log.warning(
                "step %d skipped (loss %s, grad norm %s): %d skipped so far",
                step,
                result.loss,
                result.grad_norm,
                guard.skipped_steps,
            )
        if verdict.action:  # same verdict on every rank: it comes from all-reduced numbers
            sink.write(_record(run, step, result, meter, monitor.bad_samples, guard))
            meter.reset()
        if verdict.action == "stop":
            if run.world.rank == 0:
                log.error(_divergence_message(run, step, guard, result))
            reason = "diverged"
            break
        if verdict.action == "reload":  # its line (written above) moves to metrics.abandoned.jsonl
            step, batches = _reload_after_spike(run, step, guard, sink, watchdog, batches)
        evaluations = _evaluations(run, step) if not verdict.action else {}
        reason = _stop_reason(run, step, preemption.agree(run.device))
        if not verdict.action and (
            step % run.cfg.logging.log_every_steps == 0 or evaluations or reason or verdict.skipped or verdict.spike
        ):
            sink.write({**_record(run, step, result, meter, monitor.bad_samples, guard), **evaluations})
            meter.reset()
        if run.ckpt.due(step) or reason:
            _save(run, step, watchdog, monitor, guard)
    return reason, step
