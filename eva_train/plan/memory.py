"""Per-GPU memory of a pretraining step under DeepSpeed ZeRO: a model of live tensor bytes (what
`torch.cuda.max_memory_allocated` counts), checked against measured runs by `tools/plan.py --validate`.

Terms (P = trainable student parameters, N = data-parallel ranks, b = bytes of the compute dtype):
- parameters: b*P (ZeRO 1/2), b*P/N + the small parameters ZeRO-3 keeps whole (numel below
  stage3_param_persistence_threshold); ZeRO-3 also gathers whole layers while they compute.
- optimizer: fp32 master copy 4P/N + AdamW's two fp32 moments 8P/N (DeepSpeed keeps a master copy
  even in fp32); offload_optimizer moves them (and ZeRO-3's fp32 gradient partitions) to the host.
- gradients: ZeRO-1 keeps whole b*P gradients until the step and an fp32 partition 4P/N;
  ZeRO-2 a b*P/N partition + the fp32 4P/N the step reads; ZeRO-3 an fp32 flat partition 4P/N.
- buckets: DeepSpeed's reduce buffers of reduce_bucket_size elements (x2 with overlap_comm at ZeRO-1/2).
- activations per image: what autograd saves per block (below), k = round(fraction * depth)
  checkpointed blocks keep only their input and one is recomputed at a time in backward.
- teacher: its fp32 weights (frozen, outside the engine, one whole copy per GPU) and, under no_grad,
  its largest transient forward tensors; its fp32 targets live through the student's step.
- workspace: WORKSPACE_FRACTION of the card left for cuBLAS/NCCL workspaces and allocator
  fragmentation (the gap between max_memory_allocated and max_memory_reserved): a micro batch
  "fits" when the predicted peak stays below (1 - WORKSPACE_FRACTION) of the card.
"""

from dataclasses import dataclass, field

from eva_train.models.variants import EvaConfig

WORKSPACE_FRACTION = 0.08  # of device memory, kept free (CUDA context is outside what torch reports)
DS_DEFAULTS = {
    "reduce_bucket_size": 5e8,
    "stage3_param_persistence_threshold": 1e5,
    "stage3_max_live_parameters": 1e9,
    "stage3_prefetch_bucket_size": 5e7,
}


@dataclass(frozen=True)
class ZeroSettings:
    stage: int
    offload_optimizer: bool = False
    reduce_bucket_size: float = DS_DEFAULTS["reduce_bucket_size"]
    overlap_comm: bool = False
    persistence_threshold: float = DS_DEFAULTS["stage3_param_persistence_threshold"]
    max_live_parameters: float = DS_DEFAULTS["stage3_max_live_parameters"]
    prefetch_bucket_size: float = DS_DEFAULTS["stage3_prefetch_bucket_size"]

    @classmethod
    def from_ds_config(cls, ds: dict) -> "ZeroSettings":
        z = ds.get("zero_optimization", {})
        stage = int(z.get("stage", 0))
        offload = z.get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")
        return cls(
            stage=stage,
            offload_optimizer=offload,
            reduce_bucket_size=float(z.get("reduce_bucket_size", DS_DEFAULTS["reduce_bucket_size"])),
            overlap_comm=bool(z.get("overlap_comm", stage == 3)),  # DeepSpeed's default: on for stage 3
            persistence_threshold=float(
                z.get("stage3_param_persistence_threshold", DS_DEFAULTS["stage3_param_persistence_threshold"])
            ),
            max_live_parameters=float(z.get("stage3_max_live_parameters", DS_DEFAULTS["stage3_max_live_parameters"])),
            prefetch_bucket_size=float(
                z.get("stage3_prefetch_bucket_size", DS_DEFAULTS["stage3_prefetch_bucket_size"])
            ),
        )


@dataclass(frozen=True)
class StudentShape:
    arch: EvaConfig
    params: int  # trainable parameters (backbone, mask token, MIM head)
    persistent_params: int  # ZeRO-3 keeps these whole: parameters below the persistence threshold
    largest_param: int  # numel of the largest single parameter (ZeRO-3 gathers at least this)
    img_size: int
    masked_patches: int  # per image
    teacher_dim: int
    checkpointed_blocks: int

    @property
    def tokens(self) -> int:
        return (self.img_size // self.arch.patch_size) ** 2 + 1


@dataclass(frozen=True)
class TeacherShape:
    params: int
    width: int
    mlp_hidden: int
    tokens: int
    out_dim: int
    input_px: int


@dataclass
class MemoryBreakdown:
    """Bytes per GPU; `peak` is the largest of the three phases (teacher forward, student
    forward+backward, optimizer step), each a sum of the items live in it (so the items can add up to
    more than the peak)."""

    items: dict[str, float] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def peak(self) -> float:
        return max(self.phases.values())


def block_saved_elements(a: EvaConfig, tokens: int) -> float:
    """Elements autograd keeps per image for one block's backward (non-checkpointed), counted from
    eva_train/models/blocks.py: norm1 input and output, the q/k/v storage (the fused qkv output is
    kept whole while v views it; RoPE adds rotated q and k), the attention output,
    the residual sum and norm2 output, and the MLP's hidden tensors."""
    d, f = a.embed_dim, a.mlp_hidden_dim
    qkv = 3 + (2 if a.rope else 0) if a.qkv_fused else 3
    attention = 2 + qkv + 1 + (1 if a.scale_attn_inner else 0)  # reshaping the SDPA output is a view
    if a.swiglu:
        mlp_hidden = 5 if a.sub_ln else 4  # gate, value, silu(gate), product (+ sub-LN output)
    else:
        mlp_hidden = 2  # fc1 output (GELU input) and GELU output
    return tokens * (d * (attention + 2) + f * mlp_hidden)


def attention_stats_bytes(a: EvaConfig, tokens: int) -> float:
    return 4.0 * a.num_heads * tokens  # fp32 log-sum-exp per head and query (flash-style SDPA / ours)


def activation_bytes(s: StudentShape, dtype_bytes: int) -> dict[str, float]:
    """Per image: blocks at their peak in backward, embedding + head + loss, backward transients."""
    a, t = s.arch, s.tokens
    full = block_saved_elements(a, t) * dtype_bytes + attention_stats_bytes(a, t)
    k, depth = s.checkpointed_blocks, a.depth
    block_input = t * a.embed_dim * dtype_bytes
    # backward starts with every plain block saved; reaching the checkpointed ones, one is recomputed
    blocks = k * block_input + max((depth - k) * full, full if k else 0.0)
    px = 3 * s.img_size * s.img_size
    m = s.masked_patches
    embed_head = (
        px * dtype_bytes  # normalized images (patch conv input)
        + 2 * t * a.embed_dim * dtype_bytes  # final norm input and output
        + m * a.embed_dim * dtype_bytes  # masked tokens into the head
        + m * s.teacher_dim * (dtype_bytes + 12)
    )  # head output, fp32 pred and target in the loss
    transient = t * (a.mlp_hidden_dim + a.embed_dim) * dtype_bytes  # the first gradients of backward (fc2, fc1)
    return {"blocks": blocks, "embed_head": embed_head, "transient": transient}


def teacher_bytes(t: TeacherShape | None, on_gpu: bool) -> dict[str, float]:
    """Weights (fp32, whole) and per-image forward peak under no_grad (autocast bf16 on a GPU)."""
    if t is None:
        return {"weights": 0.0, "forward": 0.0, "targets": 0.0}
    low = 2 if on_gpu else 4
    forward = (
        2 * 3 * t.input_px** 2 * 4  # float images, normalized
        + t.tokens
        * (
            2 * t.width * 4  # residual stream in and out (fp32)
            + 2 * t.mlp_hidden * low  # MLP hidden and its activation
            + t.width * low
        )
    )  # a linear's low-precision input copy
    return {"weights": 4.0 * t.params, "forward": forward, "targets": 4.0 * (t.tokens - 1) * t.out_dim}


def state_bytes(s: StudentShape, z: ZeroSettings, world: int, dtype_bytes: int) -> dict[str, float]:
    """Persistent per-rank bytes of the engine: parameters, gradients, optimizer, buckets."""
    p, n, b = s.params, world, dtype_bytes
    if z.stage == 3:
        params = b * (p - s.persistent_params) / n + b * s.persistent_params
    else:
        params = b * p
    optimizer = 0.0 if z.offload_optimizer else 12.0 * p / n
    grads = {1: b * p + 4.0 * p / n, 2: (b + 4.0) * p / n, 3: 0.0 if z.offload_optimizer else 4.0 * p / n}[z.stage]
    copies = 2 if (z.overlap_comm and z.stage < 3) else 1
    bucket_dtype = 4 if z.stage == 1 else b  # ZeRO-1 reduces into fp32, 2 and 3 in the compute dtype
    buckets = copies * z.reduce_bucket_size * bucket_dtype  # allocated whole, even for a smaller model
    return {"parameters": params, "gradients": grads, "optimizer": optimizer, "buckets": buckets}


def gathered_bytes(s: StudentShape, z: ZeroSettings, world: int, dtype_bytes: int) -> float:
    """ZeRO-3: whole parameters gathered around a layer's compute (the live working set: bounded by
    stage3_max_live_parameters, at least a prefetch bucket and the largest parameter), minus the
    rank's own partition of them."""
    if z.stage != 3:
        return 0.0
    partitioned = s.params - s.persistent_params
    live = min(partitioned, max(z.max_live_parameters, z.prefetch_bucket_size + s.largest_param))
    return dtype_bytes * live * (1 - 1 / world)


def predict(
    s: StudentShape,
    teacher: TeacherShape | None,
    z: ZeroSettings,
    world: int,
    micro_batch: int,
    dtype_bytes: int,
    on_gpu: bool,
) -> MemoryBreakdown:
    state = state_bytes(s, z, world, dtype_bytes)
    acts = activation_bytes(s, dtype_bytes)
    tb = teacher_bytes(teacher, on_gpu)
    gathered = gathered_bytes(s, z, world, dtype_bytes)
    batch_in = micro_batch * 3 * s.img_size**2  # the uint8 batch on the device
    # ZeRO-1/2 gradients appear as backward frees the activations (and fill at the step); ZeRO-3's fp32
    # gradient partitions are allocated with the engine and live throughout
    grads_in_backward = state["gradients"] if z.stage == 3 else 0.0
    base = sum(state.values()) - state["gradients"] + tb["weights"] + batch_in
    per_image_student = acts["blocks"] + acts["embed_head"] + acts["transient"]
    items = dict(
        state,
        gathered=gathered,
        teacher_weights=tb["weights"],
        teacher_forward=micro_batch * tb["forward"],
        teacher_targets=micro_batch * tb["targets"],
        activations=micro_batch * per_image_student,
        batch=batch_in,
    )
    step_temporaries = 0.0 if z.offload_optimizer else 4.0 * s.params / world  # AdamW's update of a partition
    phases = {
        "teacher forward": base + grads_in_backward + micro_batch * tb["forward"],
        "student fwd+bwd": base + grads_in_backward + gathered + micro_batch * (tb["targets"] + per_image_student),
        "optimizer step": base + state["gradients"] + step_temporaries,
    }
    return MemoryBreakdown(items=items, phases=phases)
