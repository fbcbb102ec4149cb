"""ZeRO collective traffic per optimizer step and whether it hides under compute.

Ring collectives move (N-1)/N of the tensor through each rank's link. Per micro batch, ZeRO-3
all-gathers every partitioned parameter for the forward and again for the backward (it releases
them in between; checkpointed blocks recompute inside that backward gather) and reduce-scatters the
gradients; ZeRO-1/2 reduce the gradients (all-reduce: twice the bytes) once per micro batch (ZeRO-2,
partitioned) or at the step (ZeRO-1). Across nodes the slowest hop is the inter-node link of one
GPU (rail-optimised fabrics give each GPU its own NIC); within one node, NVLink.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class CommPlan:
    bytes_per_step: float  # through each rank's link, per optimizer step
    seconds_per_step: float  # at the link bandwidth, no overlap
    compute_seconds_per_step: float
    link_gbs: float

    @property
    def hidden(self) -> bool:
        """With overlap_comm the collectives run beside compute: they hide when they take less time."""
        return self.seconds_per_step <= self.compute_seconds_per_step

    @property
    def ratio(self) -> float:
        return self.seconds_per_step / max(self.compute_seconds_per_step, 1e-12)


def zero_bytes_per_step(stage: int, params: int, dtype_bytes: int, world: int, grad_accum: int) -> float:
    ring = (world - 1) / world
    tensor = params * dtype_bytes
    if stage == 3:
        return grad_accum * 3 * ring * tensor  # gather (fwd) + gather (bwd) + reduce-scatter
    if stage == 2:
        return grad_accum * ring * tensor + ring * tensor  # reduce-scatter per micro batch, gather updated params
    return 2 * ring * tensor + ring * tensor  # all-reduce at the step, gather updated params


def plan_comm(
    stage: int,
    params: int,
    dtype_bytes: int,
    world: int,
    grad_accum: int,
    link_gbs: float,
    compute_seconds_per_step: float,
) -> CommPlan:
    volume = zero_bytes_per_step(stage, params, dtype_bytes, world, grad_accum) if world > 1 else 0.0
    return CommPlan(
        bytes_per_step=volume,
        seconds_per_step=volume / (link_gbs * 1e9),
        compute_seconds_per_step=compute_seconds_per_step,
        link_gbs=link_gbs,
    )
