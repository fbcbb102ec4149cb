"""TEST-ONLY fault injection for the divergence guard's end-to-end tests; inert unless
EVA_FAULT_INJECT is set. Never set it in a real run.

    EVA_FAULT_INJECT="nan_loss@3,4,5"          the loss of steps 3, 4, 5 (1-based, as logged) is NaN
    EVA_FAULT_INJECT="nan_loss@3:1"            ... on rank 1 only (the other ranks must still agree)
    EVA_FAULT_INJECT="loss_spike@6-7;nan_loss@9"  cosine distance (loss + 1) x 20 at steps 6 and 7

Each (kind, step) fires once per process: a spike reload runs step numbers again on other
batches, and a real spike tied to the skipped data would not come back either.
"""

import os

import torch

ENV_VAR = "EVA_FAULT_INJECT"
KINDS = ("nan_loss", "loss_spike")
SPIKE_FACTOR = 20.0


def _steps(text: str) -> list[int]:
    steps = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        steps.extend(range(int(first), int(last or first) + 1))
    return steps


def parse(spec: str, rank: int) -> dict[int, set[str]]:
    """{step: kinds} that apply to `rank`; a malformed spec raises ValueError naming the entry."""
    plan: dict[int, set[str]] = {}
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        kind, _, where = entry.partition("@")
        steps, _, only_rank = where.partition(":")
        try:
            if kind not in KINDS or not steps:
                raise ValueError
            selected = _steps(steps)
            applies = not only_rank or int(only_rank) == rank
        except ValueError:
            raise ValueError(
                f"{ENV_VAR}: bad entry {entry!r}; write KIND@STEPS[:RANK] with KIND in "
                f"{', '.join(KINDS)}, e.g. nan_loss@3,4 or loss_spike@6-8"
            ) from None
        for step in selected if applies else ():
            plan.setdefault(step, set()).add(kind)
    return plan


class FaultPlan:
    def __init__(self, rank: int, spec: str | None = None):
        self.plan = parse(os.environ.get(ENV_VAR, "") if spec is None else spec, rank)
        self.fired: set[tuple[str, int]] = set()

    def apply(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The micro-batch loss of step number `step`, with this step's faults applied."""
        for kind in sorted(self.plan.get(step, ())):
            if (kind, step) in self.fired:
                continue
            if kind == "nan_loss":
                loss = loss * float("nan")  # through the graph: gradients become NaN as with a real one
            else:
                loss = (loss + 1.0) * SPIKE_FACTOR - 1.0
        return loss

    def step_done(self, step: int) -> None:
        """After all micro batches of `step`: its faults have fired."""
        self.fired.update((kind, step) for kind in self.plan.get(step, ()))
