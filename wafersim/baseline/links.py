"""Link specs for the baseline: scale-up fabrics, scale-out ports and datacenter-to-datacenter
links, as bandwidth per direction and a per-message latency (the alpha of alpha-beta costs).

Bandwidths are datasheet figures (cited in docs/gpu_baseline.md); latencies are typical
one-way software-to-software figures and are all marked (check) there: override them with
`dataclasses.replace` or build a LinkSpec of your own. NVLink 4 also carries the fraction of
its bandwidth and the fixed cost per NCCL call that this repo measured on two H200s
(benchmarks/gpu/calibrate.py --nccl, results/h200x2.jsonl); other links, unmeasured, keep
their datasheet bandwidth and no fixed cost.

>>> LINKS["ib-ndr"].bw_Bps
50000000000.0
>>> round(wan(distance_km=1000).latency_s, 6)
0.005
"""

from __future__ import annotations

from dataclasses import dataclass

# Light in optical fibre travels at about c / 1.47, i.e. about 4.9 us per km one way
# (so "1 ms per 100 km" is the round trip). We round to 5 us per km.
FIBRE_S_PER_KM = 5e-6


@dataclass(frozen=True)
class LinkSpec:
    """A link class: datasheet bytes/s in each direction (per GPU for scale-up fabrics, per
    port for NICs, in total for a WAN link), seconds of latency per message (per step of a
    collective), the fraction of the bandwidth that transfers reach, and a fixed cost per
    collective or transfer call (the communication library's start and completion)."""

    name: str
    bw_Bps: float
    latency_s: float
    achievable_frac: float = 1.0
    collective_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.bw_Bps > 0:
            raise ValueError(f"LinkSpec {self.name}: bw_Bps={self.bw_Bps} must be > 0")
        if not self.latency_s >= 0:
            raise ValueError(f"LinkSpec {self.name}: latency_s={self.latency_s} must be >= 0")
        if not 0 < self.achievable_frac <= 1:
            raise ValueError(f"LinkSpec {self.name}: achievable_frac={self.achievable_frac} "
                             "must be in (0, 1]")
        if not self.collective_s >= 0:
            raise ValueError(f"LinkSpec {self.name}: collective_s={self.collective_s} must be "
                             ">= 0")

    @property
    def rate_Bps(self) -> float:
        """Achievable bytes/s in each direction."""
        return self.bw_Bps * self.achievable_frac

    def transfer_s(self, nbytes: float) -> float:
        """One call sending one message: fixed cost + alpha + bytes / beta."""
        return self.collective_s + self.latency_s + nbytes / self.rate_Bps


GB = 1e9
# Fitted (calibrate.py --nccl) to the CUDA-graph NCCL all-reduce on two H200s, 8 KB - 256 MB
# (results/h200x2.jsonl): NVLink 4's achievable fraction and NCCL's fixed cost per call.
NVLINK4_FRAC = 0.598
NCCL_COLLECTIVE_S = 9.96e-6
LINKS: dict[str, LinkSpec] = {
    # NVLink 3 (A100): 600 GB/s total per GPU = 300 GB/s each way.
    "nvlink3": LinkSpec("nvlink3", 300 * GB, 1.0e-6),
    # NVLink 4 (H100/H200/H20): 900 GB/s total per GPU = 450 GB/s each way.
    "nvlink4": LinkSpec("nvlink4", 450 * GB, 1.0e-6, NVLINK4_FRAC, NCCL_COLLECTIVE_S),
    # Huawei HCCS (Ascend 910B): about 392 GB/s total per chip (check) = 196 GB/s each way.
    "hccs": LinkSpec("hccs", 196 * GB, 1.5e-6),
    # PCIe x16: Gen4 16 GT/s, Gen5 32 GT/s per lane, 128b/130b coding.
    "pcie4": LinkSpec("pcie4", 31.5 * GB, 2.0e-6),
    "pcie5": LinkSpec("pcie5", 63.0 * GB, 2.0e-6),
    # InfiniBand per port: HDR 200 Gb/s, NDR 400 Gb/s.
    "ib-hdr": LinkSpec("ib-hdr", 25 * GB, 5.0e-6),
    "ib-ndr": LinkSpec("ib-ndr", 50 * GB, 5.0e-6),
    # RoCE v2 over 200 GbE per port (Ascend 910B servers ship 8 such ports) (check).
    "roce-200g": LinkSpec("roce-200g", 25 * GB, 8.0e-6),
    "roce-400g": LinkSpec("roce-400g", 50 * GB, 8.0e-6),
}


def wan(distance_km: float = 100.0, gbit_per_s: float = 100.0,
        s_per_km: float = FIBRE_S_PER_KM, fixed_s: float = 0.0) -> LinkSpec:
    """A datacenter-to-datacenter link: `gbit_per_s` each way in total (shared by every GPU
    pair that crosses it), latency = fixed_s + distance_km * s_per_km one way."""
    if distance_km < 0:
        raise ValueError(f"wan: distance_km={distance_km} must be >= 0")
    return LinkSpec(f"wan-{distance_km:g}km", gbit_per_s * 1e9 / 8,
                    fixed_s + distance_km * s_per_km)


def get_link(name: str) -> LinkSpec:
    """A preset by name ("nvlink4", "ib-ndr", ...), or "wan:<km>" / "<km>km" for a WAN link."""
    key = name.lower()
    if key in LINKS:
        return LINKS[key]
    km = key.removeprefix("wan:").removesuffix("km")
    try:
        return wan(float(km))
    except ValueError:
        known = ", ".join(LINKS)
        raise KeyError(f"unknown link {name!r}; known: {known}, or wan:<km>, or <km>km") from None
