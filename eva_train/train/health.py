"""Divergence guard: the per-step health verdict every rank reaches from the same agreed numbers.

A step is *bad* when its loss is non-finite on any rank, or its global gradient norm is non-finite
while no loss scale can explain it (fp32/bf16 always; fp16 once its dynamic scale is down to 1:
above that, an overflow is the scaler searching for its scale). DeepSpeed skips the optimizer step
of every such step (the engine makes a non-finite loss give non-finite gradients, and the ZeRO
optimizers check the global norm before updating), so weights and Adam moments stay untouched;
the guard counts the skip (`skipped_steps`, cumulative over resumes) and stops the run after
`train.max_bad_steps` consecutive bad steps, before anything is saved.

Checkpoints are written only while no bad or spike streak is open. Huge but finite weights (lr
1e30: 6e29 after one update) pass a NaN scan; what gives them away is the loss of the steps run
FROM them. So a checkpoint is `confirmed` by the first step after it that is applied with a finite
loss and norm (skipped steps leave its weights as they were, so that step ran from them), and is
marked `healthy: false` when the run stops for divergence before any such step; retention never
deletes the newest confirmed one (eva_train.runtime.checkpoint). One bad batch after a save thus
costs the checkpoint nothing.

Loss spikes (off unless `train.spike_factor > 0`): the loss is a negative cosine (>= -1), so the
statistic is the cosine distance `loss + 1` (>= 0). A step spikes when its distance exceeds
`spike_factor` x the median distance of the last `spike_window` healthy, non-spike steps (armed
once the window is full). `spike_patience` consecutive spikes ask the loop to reload the newest
healthy checkpoint and skip the batches since it.
"""

import statistics
from dataclasses import dataclass
from typing import Any

LOSS_FLOOR = -1.0  # masked_cosine_loss is -mean cos: never below -1


@dataclass
class Verdict:
    bad: bool  # non-finite: counted toward max_bad_steps
    skipped: bool  # the optimizer step was not applied
    spike: bool
    action: str = ""  # "" | "stop" (K bad in a row) | "reload" (spike patience reached)


class DivergenceGuard:
    """Same inputs on every rank (all-reduced loss and flags, DeepSpeed's global norm) -> same verdicts."""

    def __init__(self, train_cfg, state: dict[str, Any] | None = None):
        self.max_bad_steps = train_cfg.max_bad_steps
        self.spike_factor, self.spike_window = train_cfg.spike_factor, train_cfg.spike_window
        self.spike_patience = train_cfg.spike_patience
        state = state or {}
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.spike_reloads = int(state.get("spike_reloads", 0))
        self.recent: list[float] = [float(x) for x in state.get("recent_distances", [])]
        # streaks are never saved: no checkpoint is written while one is open (may_save)
        self.bad_streak = self.spike_streak = 0
        self.streak_start: int | None = None  # first step of the open bad or spike streak

    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped_steps": self.skipped_steps,
            "spike_reloads": self.spike_reloads,
            "recent_distances": list(self.recent),
        }

    def may_save(self) -> bool:
        """A checkpoint now would hold state from finite, non-spiking steps only."""
        return self.bad_streak == 0 and self.spike_streak == 0

    def observe(self, step: int, loss: float, loss_finite: bool, grads_finite: bool, loss_scale: float) -> Verdict:
        """Step number `step` (1-based, as logged) has run: classify it and say what the loop must do."""
        skipped = not grads_finite  # DeepSpeed applies a step exactly when the global norm is finite
        bad = not loss_finite or (skipped and loss_scale <= 1.0)
        if skipped:
            self.skipped_steps += 1
        if bad:
            self.bad_streak += 1
            self.spike_streak = 0
            self.streak_start = step if self.bad_streak == 1 else self.streak_start
            return Verdict(True, skipped, False, "stop" if self.bad_streak >= self.max_bad_steps else "")
        if skipped:  # fp16 scale search: weights untouched, the streak neither grows nor ends
            return Verdict(False, True, False)
        self.bad_streak = 0
        return self._observe_spike(step, loss)

    def _observe_spike(self, step: int, loss: float) -> Verdict:
        if self.spike_factor <= 0:
            return Verdict(False, False, False)
        distance = loss - LOSS_FLOOR
        armed = len(self.recent) >= self.spike_window
        if armed and distance > self.spike_factor * statistics.median(self.recent):
            self.spike_streak += 1
            self.streak_start = step if self.spike_streak == 1 else self.streak_start
            return Verdict(False, False, True, "reload" if self.spike_streak >= self.spike_patience else "")
        self.spike_streak = 0
        self.recent = (self.recent + [distance])[-self.spike_window :]
        return Verdict(False, False, False)

    def spike_handled(self) -> None:
        """The loop reloaded (or could not): the streak is over either way."""
        self.spike_streak = 0
        self.spike_reloads += 1
