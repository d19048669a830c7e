"""GPU specs for the baseline: datasheet peaks and the fractions of them that kernels reach.

Peaks come from vendor datasheets (docs/gpu_baseline.md cites each; figures marked (check)
there are widely quoted but unconfirmed). The achievable fractions and per-kernel overheads
of the H100 and H200 were calibrated from this repo's own microbenchmarks by
benchmarks/gpu/calibrate.py (results in benchmarks/gpu/results/h100.jsonl and h200.jsonl),
and so were their kernel models (kernels.py forms, kernel_models.py constants, fitted to
results/h100_kernels.jsonl and h200_kernels.jsonl); GPUs we could not measure borrow the
H100's measured fractions, overheads and kernel models.

>>> get_gpu("h100").hbm_bw_Bps
3350000000000.0
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from wafersim.baseline.kernel_models import H100_KERNELS, H200_KERNELS
from wafersim.baseline.kernels import KernelModels


@dataclass(frozen=True)
class GPUSpec:
    """One GPU model. Rates per second, sizes in bytes, times in seconds.

    `kernel_overhead_s` is the host's launch cost per kernel in eager mode;
    `graph_kernel_overhead_s` the gap per kernel inside a CUDA graph;
    `matmul_overhead_s` the extra fixed cost of each cuBLAS matmul call on top of that.
    `kernels` holds the per-kernel models fitted to kernel microbenchmarks (kernels.py); None
    charges every kernel the plain roofline.
    `intra_node_link` and `nic_link` name LinkSpecs in links.LINKS (scale-up and the per-GPU
    scale-out port). `max_per_node` is how many sit on one scale-up fabric.
    `peak_flops` lists the dense tensor-core rates the datasheet gives (fp8, int8, int4 where
    it has them: compiler.quant's weight dtypes run there); `sparse_24` says the datasheet gives
    a 2:4 "with sparsity" rate (twice the dense one: half the multiplies at the same rate).
    """

    name: str
    peak_flops: dict = field(hash=False)  # dtype ("bf16", "fp16", "fp32", "fp8", ...) -> FLOP/s
    hbm_bytes: float
    hbm_bw_Bps: float
    achievable_flops_frac: float
    achievable_bw_frac: float
    kernel_overhead_s: float
    graph_kernel_overhead_s: float
    power_w: float | None = None
    matmul_overhead_s: float = 0.0
    intra_node_link: str = "nvlink4"
    nic_link: str = "ib-ndr"
    max_per_node: int = 8
    calibration: str = ""
    kernels: KernelModels | None = field(default=None, hash=False, compare=False)
    sparse_24: bool = True

    def __post_init__(self) -> None:
        for f in ("hbm_bytes", "hbm_bw_Bps"):
            if not getattr(self, f) > 0:
                raise ValueError(f"GPUSpec {self.name}: {f}={getattr(self, f)} must be > 0")
        for f in ("achievable_flops_frac", "achievable_bw_frac"):
            if not 0 < getattr(self, f) <= 1:
                raise ValueError(f"GPUSpec {self.name}: {f}={getattr(self, f)} must be in (0, 1]")
        for dtype, rate in self.peak_flops.items():
            if not rate > 0:
                raise ValueError(f"GPUSpec {self.name}: peak_flops[{dtype!r}]={rate} must be > 0")

    def flops_rate(self, dtype: str) -> float:
        """Achievable FLOP/s for `dtype`."""
        try:
            return self.peak_flops[dtype] * self.achievable_flops_frac
        except KeyError:
            have = ", ".join(self.peak_flops)
            raise ValueError(f"{self.name} has no {dtype} rate; it has {have}") from None

    @property
    def bw_rate(self) -> float:
        """Achievable HBM bytes/s."""
        return self.hbm_bw_Bps * self.achievable_bw_frac


# Calibrated from benchmarks/gpu/results/h100.jsonl (benchmarks/gpu/calibrate.py):
# GEMV fit 2.98 TB/s + 5.21 us per call; GEMM 711 TFLOP/s; graph gap 1.18 us; eager 8.99 us.
# Kernel models: kernel_models.py, fitted to results/h100_kernels.jsonl (+ h100.jsonl matmuls).
H100_CAL = dict(achievable_bw_frac=0.890, achievable_flops_frac=0.719,
                graph_kernel_overhead_s=1.18e-6, matmul_overhead_s=4.03e-6,
                kernel_overhead_s=8.99e-6, kernels=H100_KERNELS)
# Calibrated from benchmarks/gpu/results/h200.jsonl (benchmarks/gpu/calibrate.py):
# GEMV fit 4.41 TB/s + 5.67 us per call; GEMM 699 TFLOP/s; graph gap 1.11 us; eager 6.36 us.
# Kernel models: kernel_models.py, fitted to results/h200_kernels.jsonl (+ h200.jsonl matmuls).
H200_CAL = dict(achievable_bw_frac=0.919, achievable_flops_frac=0.707,
                graph_kernel_overhead_s=1.11e-6, matmul_overhead_s=4.56e-6,
                kernel_overhead_s=6.36e-6, kernels=H200_KERNELS)
_BORROWED = ("fractions, overheads and kernel models borrowed from the H100 calibration "
             "(not measured)")

A100 = GPUSpec(
    "A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12, "int8": 624e12, "int4": 1248e12},
    80e9, 2.039e12,
    power_w=400, intra_node_link="nvlink3", nic_link="ib-hdr", calibration=_BORROWED,
    **H100_CAL,
)
H100 = GPUSpec(
    "H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "fp8": 1979e12, "int8": 1979e12},
    80e9, 3.35e12,
    power_w=700, calibration="benchmarks/gpu/results/h100.jsonl", **H100_CAL,
)
H200 = GPUSpec(
    "H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "fp8": 1979e12, "int8": 1979e12},
    141e9, 4.8e12,
    power_w=700, calibration="benchmarks/gpu/results/h200.jsonl", **H200_CAL,
)
H20 = GPUSpec(
    "H20", {"bf16": 148e12, "fp16": 148e12, "fp32": 44e12, "fp8": 296e12, "int8": 296e12},
    96e9, 4.0e12,
    power_w=400, calibration=_BORROWED, **H100_CAL,
)
ASCEND_910B = GPUSpec(
    "910B", {"bf16": 320e12, "fp16": 320e12, "int8": 640e12}, 64e9, 1.6e12,
    power_w=400, intra_node_link="hccs", nic_link="roce-200g", calibration=_BORROWED,
    sparse_24=False,
    **H100_CAL,
)

GPUS: dict[str, GPUSpec] = {g.name.lower(): g for g in (A100, H100, H200, H20, ASCEND_910B)}
_ALIASES = {
    "a100-80gb": "a100", "a100-sxm": "a100", "h100-sxm": "h100", "h200-sxm": "h200",
    "ascend910b": "910b", "ascend-910b": "910b",
}


def get_gpu(name: str) -> GPUSpec:
    """A preset by name, any case (A100, H100, H200, H20, 910B and a few aliases)."""
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in GPUS:
        raise KeyError(f"unknown GPU {name!r}; known: {', '.join(g.name for g in GPUS.values())}")
    return GPUS[key]


def with_overrides(gpu: GPUSpec, **changes) -> GPUSpec:
    """A copy of `gpu` with some fields changed, e.g. a (check) figure replaced."""
    return replace(gpu, **changes)
