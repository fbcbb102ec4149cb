"""The one table of GPU specs (memory, dense 16-bit peak, links) and the one MFU formula.

Peaks are NVIDIA's dense (no sparsity) bf16/fp16 tensor-core numbers for the SXM parts. `memory_gib`
is what CUDA reports as total memory (what an allocator can ever hand out), not the marketing GB.
`link_gbs` is the inter-node bandwidth per GPU in one direction (one 400 Gb/s NIC per H100/H200,
200 Gb/s per A100 in the usual rail-optimised clusters); `nvlink_gbs` the intra-node one.
"""

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gib: float  # usable device memory
    bf16_tflops: float  # dense peak, TFLOP/s
    link_gbs: float  # inter-node GB/s per GPU, one direction
    nvlink_gbs: float  # intra-node GB/s per GPU, one direction
    match: tuple[str, ...] = ()  # all of these in a CUDA device name (upper case) select this entry

    @property
    def peak_flops(self) -> float:
        return self.bf16_tflops * 1e12

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * 2**30


GPUS: dict[str, GpuSpec] = {
    "h100": GpuSpec("H100 80GB", 79.1, 989.0, 50.0, 450.0, ("H100",)),
    "h200": GpuSpec("H200 141GB", 139.8, 989.0, 50.0, 450.0, ("H200",)),
    "gh200": GpuSpec("GH200 96GB", 94.5, 989.0, 50.0, 450.0, ("GH200",)),
    "a100-80gb": GpuSpec("A100 80GB", 79.1, 312.0, 25.0, 300.0, ("A100",)),
    "a100-40gb": GpuSpec("A100 40GB", 39.4, 312.0, 25.0, 300.0, ("A100", "40GB")),
    "b200": GpuSpec("B200 180GB", 178.4, 2250.0, 100.0, 900.0, ("B200",)),
    "l40s": GpuSpec("L40S 48GB", 44.4, 362.0, 25.0, 32.0, ("L40S",)),
    "a10": GpuSpec("A10 24GB", 22.1, 125.0, 12.5, 32.0, ("A10",)),
}


def spec_for_device(device_name: str) -> GpuSpec | None:
    """The entry for a CUDA device name ("NVIDIA H100 80GB HBM3"); the most specific match wins
    (GH200 before H200, A100 40GB before A100). None for unknown devices and CPUs."""
    upper = device_name.upper()
    hits = [s for s in GPUS.values() if all(token in upper for token in s.match)]
    return max(hits, key=lambda s: sum(map(len, s.match)), default=None)


def peak_flops(device_name: str, precision: str) -> float | None:
    """Dense bf16/fp16 peak FLOP/s of one device by its name; None when unknown or not 16-bit."""
    spec = spec_for_device(device_name) if precision in ("bf16", "fp16") else None
    return spec.peak_flops if spec else None


def custom_spec(
    base: GpuSpec | None, memory_gib: float | None = None, tflops: float | None = None, link_gbs: float | None = None
) -> GpuSpec:
    """`base` with any of its numbers replaced (a card not in the table needs all three)."""
    if base is None:
        missing = [
            n for n, v in (("--gpu-mem", memory_gib), ("--gpu-tflops", tflops), ("--link-gbps", link_gbs)) if v is None
        ]
        if missing:
            raise ValueError(
                f"a custom GPU needs {', '.join(missing)} too (or --gpu NAME with one of {', '.join(GPUS)})"
            )
        base = GpuSpec("custom", 0.0, 0.0, 0.0, 0.0)
    changes = {
        k: v for k, v in (("memory_gib", memory_gib), ("bf16_tflops", tflops), ("link_gbs", link_gbs)) if v is not None
    }
    name = base.name if not changes else f"{base.name} ({', '.join(f'{k}={v:g}' for k, v in changes.items())})"
    return replace(base, name=name, nvlink_gbs=max(base.nvlink_gbs, changes.get("link_gbs", 0.0)), **changes)


def mfu(flops_per_image: float, images_per_sec: float, num_gpus: int, peak_flops_per_gpu: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all GPUs."""
    return flops_per_image * images_per_sec / (peak_flops_per_gpu * num_gpus)
