"""GPU clusters: the spec grammar, the ClusterSpec it builds, and the layer split solver.

Grammar (spaces ignored, GPU names any case)::

    spec   := [ "dp" N ":" ] [ "pp" K ":" ] group { "+" group } { ";" DC "-" DC "=" LINK }
    group  := N "x" GPU [ "@" DC ]              one node of N GPUs
            | N "x(" M "x" GPU ")" [ "@" DC ]   N nodes of M GPUs each

Examples: ``8xA100``, ``1xH100``, ``4xA100+4xH20``, ``dp2:8xH100``, ``pp2:8xH100``,
``2x(8xH100)@dc1+1x(8x910B)@dc2;dc1-dc2=1000km``. LINK is a preset of links.LINKS
(``ib-ndr``), ``wan:<km>`` or ``<km>km`` (a links.wan link of that length).

Parallelism: tensor parallel inside a node (one scale-up fabric), pipeline parallel across
nodes in the order written (one node = one stage; datacenters are crossed only at stage
boundaries), and `dp` identical data-parallel replicas of that pipeline. ``ppK:`` cuts every
node into K stages of equal tensor-parallel groups that pass the residual stream over the
node's own fabric (``pp2:8xH100``: two stages of TP = 4; ``pp2:2xH200``: two of one GPU). Two
nodes of one datacenter talk through their GPUs' NIC ports (the slower of the two); two
datacenters next to each other in the pipeline need a link named after the ``;``.

Mixed GPU types get uneven layer counts: `solve_split` gives each stage layers in proportion
to its speed, never more than its GPUs' memory holds (weights + KV cache + activations).

>>> c = parse_cluster("2x(8xH100)@dc1+1x(8x910B)@dc2;dc1-dc2=1000km")
>>> [(n.gpu.name, n.n_gpus, n.datacenter) for n in c.nodes]
[('H100', 8, 'dc1'), ('H100', 8, 'dc1'), ('910B', 8, 'dc2')]
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import networkx as nx

from wafersim.baseline import costs
from wafersim.baseline.gpus import GPUS, GPUSpec, get_gpu
from wafersim.baseline.links import LINKS, LinkSpec, get_link

EXAMPLE = "8xH100 or 2x(8xH100)@dc1+1x(8x910B)@dc2;dc1-dc2=1000km"
_GROUP = re.compile(
    r"^(?P<n>\d+)x(?:\((?P<m>\d+)x(?P<gpu1>[A-Za-z0-9_-]+)\)|(?P<gpu2>[A-Za-z0-9_-]+))"
    r"(?:@(?P<dc>[A-Za-z0-9_-]+))?$"
)
_DCLINK = re.compile(r"^(?P<a>[A-Za-z0-9_-]+)-(?P<b>[A-Za-z0-9_-]+)=(?P<link>[A-Za-z0-9_.:-]+)$")
DEFAULT_DC = "dc0"


class ClusterError(ValueError):
    """A cluster spec or placement that cannot work; the message is one line."""


class SplitError(ClusterError):
    """No layer split fits the cluster's memory."""


@dataclass(frozen=True)
class Node:
    """One scale-up domain: n_gpus GPUs of one type on one fabric, in one datacenter."""

    gpu: GPUSpec
    n_gpus: int
    datacenter: str = DEFAULT_DC
    host: int | None = None  # stages cut from one node (ppK:) share its host and its fabric

    @property
    def intra_link(self) -> LinkSpec:
        return LINKS[self.gpu.intra_node_link]

    @property
    def nic(self) -> LinkSpec:
        return LINKS[self.gpu.nic_link]


@dataclass(frozen=True)
class ClusterSpec:
    """Pipeline stages (nodes, in order), data-parallel replicas and datacenter links."""

    name: str
    nodes: tuple[Node, ...]
    replicas: int = 1
    dc_links: tuple[tuple[str, str, LinkSpec], ...] = ()

    @property
    def n_gpus(self) -> int:
        return self.replicas * sum(n.n_gpus for n in self.nodes)

    def hop(self, i: int) -> tuple[str, LinkSpec]:
        """Link class ("nvlink", "internode" or "interdc") and link from stage i to i+1."""
        a, b = self.nodes[i], self.nodes[i + 1]
        if a.host is not None and a.host == b.host:
            return "nvlink", a.intra_link
        if a.datacenter == b.datacenter:
            return "internode", min(a.nic, b.nic, key=lambda link: link.bw_Bps)
        return "interdc", self.dc_link(a.datacenter, b.datacenter)

    def dc_link(self, a: str, b: str) -> LinkSpec:
        for x, y, link in self.dc_links:
            if {x, y} == {a, b}:
                return link
        raise ClusterError(
            f"cluster {self.name}: datacenters {a} and {b} are adjacent in the pipeline but "
            f"have no link; add ';{a}-{b}=<link>' (e.g. 1000km or ib-ndr)"
        )


def parse_cluster(spec: str) -> ClusterSpec:
    """Parse the grammar in the module docstring; ClusterError (one line) on any mistake."""
    if not isinstance(spec, str) or not spec.strip():
        raise ClusterError(f"cluster spec is empty; write e.g. {EXAMPLE}")
    text = re.sub(r"\s+", "", spec)
    replicas, text = _prefix(text, "dp", 1, "replicas")
    stages, text = _prefix(text, "pp", 2, "stages per node")
    body, *link_tokens = text.split(";")
    if not body:
        raise ClusterError(f"cluster spec {spec!r}: no GPU groups; write e.g. {EXAMPLE}")
    nodes: list[Node] = []
    named = []
    for token in body.split("+"):
        group, has_dc = _parse_group(token)
        for node in group:
            if node.n_gpus % stages:
                raise ClusterError(f"cluster spec token {token!r}: pp{stages} needs a GPU "
                                   f"count per node divisible by {stages}")
            host = len(nodes) if stages > 1 else None
            nodes.extend(replace(node, n_gpus=node.n_gpus // stages, host=host)
                         for _ in range(stages))
        named.append((token, has_dc))
    if any(d for _, d in named) and not all(d for _, d in named):
        token = next(t for t, d in named if not d)
        raise ClusterError(f"cluster spec token {token!r}: name its datacenter (@<name>) "
                           "since other groups do")
    links = tuple(_parse_dclink(t) for t in link_tokens)
    cluster = ClusterSpec(_normal_name(replicas, stages, body, links), tuple(nodes), replicas,
                          links)
    for i in range(len(nodes) - 1):
        cluster.hop(i)  # raises when adjacent datacenters have no link
    return cluster


def _prefix(text: str, key: str, least: int, what: str) -> tuple[int, str]:
    """(N, the rest) of a leading "<key>N:", or (1, text) without one."""
    m = re.match(rf"^{key}(\d*):", text, re.IGNORECASE)
    if not m:
        return 1, text
    if not m.group(1) or int(m.group(1)) < least:
        raise ClusterError(f"cluster spec token {m.group(0)!r}: {what} must be {key}<N> with "
                           f"N >= {least}, e.g. {key}2:8xH100")
    return int(m.group(1)), text[m.end():]


def _parse_group(token: str) -> tuple[list[Node], bool]:
    if not token:
        raise ClusterError("cluster spec has an empty group (two '+' in a row, or one at an "
                           f"end); write e.g. {EXAMPLE}")
    m = _GROUP.match(token)
    if not m:
        raise ClusterError(f"cluster spec token {token!r}: expected <count>x<GPU> or "
                           "<nodes>x(<count>x<GPU>), optionally @<datacenter>")
    nodes_n = int(m.group("n"))
    per_node = int(m.group("m")) if m.group("m") else nodes_n
    if m.group("m") is None:
        nodes_n = 1
    if nodes_n < 1 or per_node < 1:
        raise ClusterError(f"cluster spec token {token!r}: counts must be >= 1")
    name = m.group("gpu1") or m.group("gpu2")
    try:
        gpu = get_gpu(name)
    except KeyError:
        known = ", ".join(g.name for g in GPUS.values())
        raise ClusterError(f"cluster spec token {token!r}: unknown GPU {name!r}; known: "
                           f"{known}") from None
    if per_node > gpu.max_per_node:
        raise ClusterError(
            f"cluster spec token {token!r}: at most {gpu.max_per_node} {gpu.name} per node; "
            f"write e.g. {math.ceil(per_node / gpu.max_per_node)}x({gpu.max_per_node}x{gpu.name})"
        )
    dc = m.group("dc") or DEFAULT_DC
    return [Node(gpu, per_node, dc) for _ in range(nodes_n)], m.group("dc") is not None


def _parse_dclink(token: str) -> tuple[str, str, LinkSpec]:
    m = _DCLINK.match(token)
    if not m:
        raise ClusterError(f"cluster spec token {token!r}: expected <dc>-<dc>=<link>, "
                           "e.g. dc1-dc2=1000km")
    try:
        link = get_link(m.group("link"))
    except KeyError:
        raise ClusterError(f"cluster spec token {token!r}: unknown link {m.group('link')!r}; "
                           f"known: {', '.join(LINKS)}, wan:<km>, <km>km") from None
    return m.group("a"), m.group("b"), link


def _normal_name(replicas: int, stages: int, body: str, links) -> str:
    groups = []
    for token in body.split("+"):
        m = _GROUP.match(token)
        gpu = get_gpu(m.group("gpu1") or m.group("gpu2")).name
        g = f"{m.group('n')}x({m.group('m')}x{gpu})" if m.group("m") else f"{m.group('n')}x{gpu}"
        groups.append(g + (f"@{m.group('dc')}" if m.group("dc") else ""))
    name = "+".join(groups)
    if links:
        name += "".join(f";{a}-{b}={link.name}" for a, b, link in links)
    name = f"pp{stages}:{name}" if stages > 1 else name
    return f"dp{replicas}:{name}" if replicas > 1 else name


# --------------------------------------------------------------------------- the split
@dataclass(frozen=True)
class Split:
    """Layers per pipeline stage, and the memory each stage's GPUs need against what they have.

    mem_per_gpu and capacity are bytes on one GPU of each stage; `fits` is False only when
    the split was asked for with respect_memory=False and some stage overflows.
    """

    layers: tuple[int, ...]
    mem_per_gpu: tuple[float, ...]
    weight_per_gpu: tuple[float, ...]
    kv_per_gpu: tuple[float, ...]
    act_per_gpu: tuple[float, ...]
    capacity: tuple[float, ...]
    layer_time_s: tuple[float, ...]  # estimated time of one layer on each stage

    @property
    def fits(self) -> bool:
        return all(m <= c for m, c in zip(self.mem_per_gpu, self.capacity, strict=True))

    @property
    def starts(self) -> tuple[int, ...]:
        out, s = [], 0
        for n in self.layers:
            out.append(s)
            s += n
        return tuple(out)


def layer_time_s(works, node: Node, cuda_graphs: bool = True) -> float:
    """Time of these ops on one node: their kernels plus their TP collectives."""
    total = 0.0
    for w in works:
        c = costs.work_cost(w, node.gpu, node.n_gpus, node.intra_link, cuda_graphs)
        total += c.kernel_s + c.comm_s
    return total


def stage_memory(plan: costs.Plan, node: Node, first: bool, last: bool, nlayers: int,
                 start: int) -> tuple[float, float, float]:
    """(weights, KV cache, activations) in bytes on one GPU of a stage holding layers
    [start, start + nlayers), plus the embeddings if first and the head if last."""
    works = [w for layer in plan.layers[start:start + nlayers] for w in layer]
    if first:
        works += plan.pre
    if last:
        works += plan.post
    tp = node.n_gpus
    return (costs.weight_store_bytes(works, tp), costs.kv_store_bytes(works, tp),
            costs.activation_bytes(works, tp, plan.hidden_bytes))


def solve_split(graph: nx.DiGraph, cluster: ClusterSpec, *, cuda_graphs: bool = True,
                flash_prefill: bool = True, respect_memory: bool = True,
                plan: costs.Plan | None = None) -> Split:
    """Layers per stage: each layer goes, one at a time, to the stage that would finish
    soonest with it, among stages whose GPUs can still hold it. Greedy assignment of unit jobs
    to machines of different speeds minimises the slowest stage. Raises SplitError when some
    layer fits nowhere (respect_memory=False ignores memory and reports the overflow instead).
    """
    plan = plan or costs.plan(graph, flash_prefill)
    nodes, nlayers = cluster.nodes, len(plan.layers)
    p = len(nodes)
    if nlayers < p:
        raise SplitError(f"{graph.graph['cfg'].name} has {nlayers} layers, fewer than the "
                         f"{p} pipeline stages of {cluster.name}")
    per_layer = [layer_time_s(plan.layers[0], n, cuda_graphs) for n in nodes]
    extra = [0.0] * p
    extra[0] += sum(layer_time_s([w], nodes[0], cuda_graphs) for w in plan.pre)
    extra[-1] += sum(layer_time_s([w], nodes[-1], cuda_graphs) for w in plan.post)
    capacity = [n.gpu.hbm_bytes for n in nodes]
    upper = [_MemoryBound(plan, nodes[i], i == 0, i == p - 1) for i in range(p)]
    counts = [1] * p

    def room(i: int) -> bool:
        return not respect_memory or upper[i](counts[i] + 1) <= capacity[i]

    for _ in range(nlayers - p):
        options = [i for i in range(p) if room(i)]
        if not options:
            raise SplitError(_no_fit_message(graph, cluster, upper, counts, capacity))
        best = min(options, key=lambda i: ((counts[i] + 1) * per_layer[i] + extra[i], i))
        counts[best] += 1
    parts = [stage_memory(plan, nodes[i], i == 0, i == p - 1, counts[i], sum(counts[:i]))
             for i in range(p)]
    split = Split(tuple(counts), tuple(sum(x) for x in parts), tuple(x[0] for x in parts),
                  tuple(x[1] for x in parts), tuple(x[2] for x in parts), tuple(capacity),
                  tuple(per_layer))
    if respect_memory and not split.fits:
        raise SplitError(_no_fit_message(graph, cluster, upper, counts, capacity))
    return split


class _MemoryBound:
    """Bytes per GPU of a stage holding n layers, bounded above by its heaviest layer (layers
    of one model may differ), so that any contiguous block the solver picks fits under it."""

    def __init__(self, plan: costs.Plan, node: Node, first: bool, last: bool):
        self.plan = plan
        w, kv, act = stage_memory(plan, node, first, last, 0, 0)
        per = [stage_memory(plan, node, False, False, 1, j) for j in range(len(plan.layers))]
        self.base = w + kv
        self.layer = max(x[0] + x[1] for x in per)
        self.act = max([act] + [x[2] for x in per])

    def __call__(self, n: int) -> float:
        return self.base + n * self.layer + self.act


def _no_fit_message(graph, cluster: ClusterSpec, upper, counts, capacity) -> str:
    cfg, g = graph.graph["cfg"], graph.graph
    plan = upper[0].plan
    works = [w for part in (plan.pre, *plan.layers, plan.post) for w in part]
    weights, kv = costs.weight_store_bytes(works, 1), costs.kv_store_bytes(works, 1)
    room = ", ".join(f"{n.n_gpus}x{n.gpu.name} {c / 1e9:.0f} GB each"
                     for n, c in zip(cluster.nodes, capacity, strict=True))
    return (f"{cfg.name} at batch {g['batch']}, ctx {g['ctx_len'] + g['seq_len']} does not fit "
            f"{cluster.name}: weights {weights / 1e9:.1f} GB + KV cache {kv / 1e9:.1f} GB, room "
            f"for {sum(counts)} of {len(plan.layers)} layers ({room}); use more or larger GPUs, "
            "or a smaller batch or context")
