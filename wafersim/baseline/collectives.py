"""Alpha-beta costs of the collectives a GPU cluster runs, per link class.

Each function returns a `Collective`: its time in seconds and the bytes each participating GPU
sends (every byte sent is received by exactly one other GPU, so sent == received summed over
the group). `nbytes` is always the size of the full tensor on one GPU.

Every call also pays the link's fixed cost per call, `collective_s` (written c below), and bw
is the link's achievable rate (LinkSpec.rate_Bps).

- ring all-reduce: reduce-scatter then all-gather around a ring of n GPUs;
  time c + 2(n-1)/n * bytes/bw + 2(n-1) * alpha, each GPU sends 2(n-1)/n * bytes.
- tree all-reduce: reduce up a binary tree then broadcast down, not pipelined;
  time c + 2 * ceil(log2 n) * (alpha + bytes/bw); 2(n-1) full-tensor messages in total (n-1
  up, n-1 down), spread evenly over the n GPUs in sent_per_gpu.
- all-gather (ring): each GPU contributes bytes/n; time c + (n-1)/n * bytes/bw + (n-1) * alpha.
- send/recv: c + alpha + bytes/bw, one sender.

>>> from wafersim.baseline.links import LinkSpec
>>> link = LinkSpec("x", bw_Bps=100.0, latency_s=1.0)
>>> ring_allreduce(400, 4, link).time_s   # 2*3/4*400/100 + 2*3*1
12.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from wafersim.baseline.links import LinkSpec


@dataclass(frozen=True)
class Collective:
    """Time of one collective and the bytes each of its n GPUs sends (total = sum)."""

    time_s: float
    sent_per_gpu: tuple[float, ...]

    @property
    def total_bytes(self) -> float:
        return float(sum(self.sent_per_gpu))


NOTHING = Collective(0.0, ())


def ring_allreduce(nbytes: float, n: int, link: LinkSpec) -> Collective:
    if n <= 1 or nbytes <= 0:
        return Collective(0.0, (0.0,) * max(n, 0))
    per_gpu = 2 * (n - 1) / n * nbytes
    return Collective(link.collective_s + per_gpu / link.rate_Bps + 2 * (n - 1) * link.latency_s,
                      (per_gpu,) * n)


def tree_allreduce(nbytes: float, n: int, link: LinkSpec) -> Collective:
    if n <= 1 or nbytes <= 0:
        return Collective(0.0, (0.0,) * max(n, 0))
    depth = math.ceil(math.log2(n))
    sent = (2.0 * (n - 1) * nbytes / n,) * n
    return Collective(link.collective_s + 2 * depth * (link.latency_s + nbytes / link.rate_Bps),
                      sent)


def allreduce(nbytes: float, n: int, link: LinkSpec, algorithm: str = "auto") -> Collective:
    """Ring, tree, or "auto": the faster of the two (as NCCL's tuner picks per size)."""
    if algorithm == "ring":
        return ring_allreduce(nbytes, n, link)
    if algorithm == "tree":
        return tree_allreduce(nbytes, n, link)
    if algorithm == "auto":
        r, t = ring_allreduce(nbytes, n, link), tree_allreduce(nbytes, n, link)
        return r if r.time_s <= t.time_s else t
    raise ValueError(f"all-reduce algorithm={algorithm!r} is not one of ring, tree, auto")


def allgather(nbytes: float, n: int, link: LinkSpec) -> Collective:
    if n <= 1 or nbytes <= 0:
        return Collective(0.0, (0.0,) * max(n, 0))
    per_gpu = (n - 1) / n * nbytes
    return Collective(link.collective_s + per_gpu / link.rate_Bps + (n - 1) * link.latency_s,
                      (per_gpu,) * n)


def send_recv(nbytes: float, link: LinkSpec) -> Collective:
    if nbytes <= 0:
        return Collective(0.0, (0.0,))
    return Collective(link.transfer_s(nbytes), (float(nbytes),))
