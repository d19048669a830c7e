"""GPU-cluster baseline: GPU and link specs, cluster parsing, per-op roofline simulation.

    >>> import models
    >>> from wafersim.baseline import parse_cluster, simulate_cluster
    >>> g = models.build_graph(models.load_model("llama3-8b"), "decode", batch=8, ctx_len=2047)
    >>> simulate_cluster(g, parse_cluster("8xA100")).summary()["fits"]
    True

Modules: gpus (GPUSpec presets, calibrated from benchmarks/gpu), kernels (per-kernel time
models fitted to kernel microbenchmarks; their constants in the generated kernel_models),
links (LinkSpec presets, WAN), collectives (alpha-beta costs), costs (per-op sharding, kernel
time, memory), cluster (spec grammar, ClusterSpec, solve_split), simulate (simulate_cluster,
ClusterResult).
"""

from wafersim.baseline.cluster import (
    ClusterError,
    ClusterSpec,
    Node,
    Split,
    SplitError,
    parse_cluster,
    solve_split,
)
from wafersim.baseline.collectives import (
    allgather,
    allreduce,
    ring_allreduce,
    send_recv,
    tree_allreduce,
)
from wafersim.baseline.gpus import GPUS, GPUSpec, get_gpu, with_overrides
from wafersim.baseline.links import LINKS, LinkSpec, get_link, wan
from wafersim.baseline.simulate import ClusterResult, simulate_cluster

__all__ = [
    "GPUS", "LINKS", "ClusterError", "ClusterResult", "ClusterSpec", "GPUSpec", "LinkSpec",
    "Node", "Split", "SplitError", "allgather", "allreduce", "get_gpu", "get_link",
    "parse_cluster", "ring_allreduce", "send_recv", "simulate_cluster", "solve_split",
    "tree_allreduce", "wan", "with_overrides",
]
