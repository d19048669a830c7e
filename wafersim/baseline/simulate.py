"""simulate_cluster: one prefill or decode step of an op graph on a GPU cluster.

Each pipeline stage (a node, or a part of one with ``ppK:``; tensor parallel inside) runs its
layers' kernels in order, each timed by costs.work_kernel_time_s on its largest shard, with a
Megatron all-reduce after o_proj and down_proj (alpha-beta, over the node's scale-up link).
Between stages the residual stream crosses the NIC ports (the scale-up fabric between stages of
one node, or the datacenter link), split over the GPU pairs of the two stages, and is
all-gathered inside the receiving stage.

Pipeline schedule: the batch is cut into `microbatches` equal parts (default 1) that flow
through the stages in order; stage s starts micro-batch j when it has finished j-1 and j has
arrived; a link carries one transfer at a time. In decode the step ends when the last
micro-batch's sampled ids are back at the first stage (over the hops in reverse): the next
step embeds them. With one micro-batch (decode's usual case, a
step of one batch) the stages run strictly in sequence, so every GPU idles while the other
stages work: the pipeline bubble. A server interleaving several batches would fill it; that is
not modelled here. Data-parallel replicas run the same step independently.

Accounting per GPU: busy = its kernels (per-kernel overheads included); idle = everything
else up to the makespan (TP collectives, transfers, bubbles, imbalance), so busy + idle ==
makespan exactly: times are kept in integer picoseconds. Every byte sent between GPUs is
counted once as sent by one GPU and once as received by another, per link class
("nvlink" inside a node, "internode", "interdc").

>>> import models
>>> from wafersim.baseline.cluster import parse_cluster
>>> g = models.build_graph(models.load_model("llama3-8b"), "decode", batch=1, ctx_len=511)
>>> r = simulate_cluster(g, parse_cluster("1xH100"))
>>> 6.0 < r.tpot_ms < 8.0, r.fits
(True, True)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from compiler.quant import Scheme
from wafersim.baseline import costs
from wafersim.baseline.cluster import ClusterError, ClusterSpec, SplitError, solve_split
from wafersim.baseline.collectives import allgather
from wafersim.baseline.quant import quantize

LINK_CLASSES = ("nvlink", "internode", "interdc")
TOKEN_ID_BYTES = 4  # one sampled token id (int32), sent back to the first stage in decode
PS = 10**12  # picoseconds per second


def _ps(seconds: float) -> int:
    return int(round(seconds * PS))


@dataclass(frozen=True)
class ClusterResult:
    """What one step on a cluster cost; per-GPU tuples follow `gpus`.

    Times are integer picoseconds (`*_ps`) with `*_s` views; byte counts are integers.
    `ctx` is the tokens each sequence attends to at the end of the step (cached + new).
    `max_batch` is the largest batch that fits at this ctx, `max_ctx` the longest context
    that fits at this batch, both with this step's layer split. When `fits` is False the
    times are those of a split that ignores memory, and `reason` says what overflows.
    """

    system: str
    model: str
    phase: str
    batch: int
    ctx: int
    seq_len: int
    replicas: int
    microbatches: int
    cuda_graphs: bool
    gpus: tuple[str, ...]
    makespan_ps: int
    busy_ps: tuple[int, ...]
    idle_ps: tuple[int, ...]
    hbm_bytes: tuple[int, ...]
    sent_bytes: dict = field(compare=False)  # link class -> per-GPU bytes sent
    recv_bytes: dict = field(compare=False)  # link class -> per-GPU bytes received
    stage_layers: tuple[int, ...]
    stage_kernel_s: tuple[float, ...]  # kernels of one micro-batch on each stage
    stage_comm_s: tuple[float, ...]  # TP collectives of one micro-batch on each stage
    hop_s: tuple[float, ...]  # one micro-batch's transfer from stage i to i+1
    mem_per_gpu: tuple[float, ...]  # bytes needed on one GPU of each stage
    capacity: tuple[float, ...]
    fits: bool
    reason: str | None
    max_batch: int
    max_ctx: int
    flops: float
    energy_j: float | None
    # Seconds of one micro-batch over all stages, per op kind, plus "tp_collectives" and
    # "pipeline_hops": the model's own breakdown of the step.
    time_by_kind_s: dict = field(compare=False, default_factory=dict)

    @property
    def makespan_s(self) -> float:
        return self.makespan_ps / PS

    @property
    def busy_s(self) -> tuple[float, ...]:
        return tuple(b / PS for b in self.busy_ps)

    @property
    def idle_s(self) -> tuple[float, ...]:
        return tuple(i / PS for i in self.idle_ps)

    @property
    def tokens(self) -> int:
        """Tokens this step produces (decode) or consumes (prefill), all replicas."""
        per = self.batch if self.phase == "decode" else self.batch * self.seq_len
        return per * self.replicas

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.makespan_s if self.makespan_ps else 0.0

    @property
    def tpot_ms(self) -> float | None:
        return self.makespan_s * 1e3 if self.phase == "decode" else None

    @property
    def ttft_ms(self) -> float | None:
        return self.makespan_s * 1e3 if self.phase == "prefill" else None

    def link_bytes(self, link_class: str) -> int:
        """Bytes carried by one link class (each byte counted once, as sent)."""
        return int(sum(self.sent_bytes[link_class]))

    def summary(self) -> dict:
        """The DESIGN.md summary keys, then extras."""
        n = len(self.gpus)
        span = self.makespan_ps or 1
        busy = sum(self.busy_ps) / (n * span)
        idle = sum(self.idle_ps) / (n * span)
        out = {
            "system": self.system, "model": self.model, "phase": self.phase,
            "batch": self.batch, "ctx": self.ctx, "fits": self.fits,
            "makespan_s": self.makespan_s, "tokens_per_s": self.tokens_per_s,
            "tpot_ms": self.tpot_ms, "ttft_ms": self.ttft_ms,
            "busy_fraction": busy, "idle_fraction": idle,
            "onchip_bytes": int(sum(self.hbm_bytes)),
            "offchip_bytes": sum(self.link_bytes(c) for c in LINK_CLASSES),
        }
        out.update({
            "gpus": n, "replicas": self.replicas, "microbatches": self.microbatches,
            "cuda_graphs": self.cuda_graphs, "seq_len": self.seq_len,
            "nvlink_bytes": self.link_bytes("nvlink"),
            "internode_bytes": self.link_bytes("internode"),
            "interdc_bytes": self.link_bytes("interdc"),
            "energy_j": self.energy_j, "flops": self.flops,
            "stage_layers": list(self.stage_layers), "max_batch": self.max_batch,
            "max_ctx": self.max_ctx, "reason": self.reason,
        })
        return out


def simulate_cluster(graph: nx.DiGraph, cluster: ClusterSpec, *, cuda_graphs: bool = True,
                     flash_prefill: bool = True, microbatches: int = 1,
                     allreduce_algorithm: str = "auto", scheme: Scheme | None = None
                     ) -> ClusterResult:
    """Simulate one step of `graph` (models.build_graph) on `cluster` (parse_cluster), with
    weights and KV caches stored as `scheme` says (compiler.quant; baseline.quant)."""
    g = graph.graph
    if microbatches < 1 or g["batch"] % microbatches:
        raise ClusterError(f"microbatches={microbatches} must be >= 1 and divide the batch "
                           f"({g['batch']})")
    head_dim = g["cfg"].head_dim
    full = quantize(costs.plan(graph, flash_prefill), scheme, head_dim) if scheme else \
        costs.plan(graph, flash_prefill)
    try:
        split, reason = solve_split(graph, cluster, cuda_graphs=cuda_graphs, plan=full), None
    except SplitError as e:
        reason = str(e)
        split = solve_split(graph, cluster, cuda_graphs=cuda_graphs, plan=full,
                            respect_memory=False)
    plan = full
    if microbatches > 1:
        import models
        small = models.build_graph(g["cfg"], g["phase"], g["batch"] // microbatches,
                                   g["seq_len"], g["ctx_len"])
        plan = costs.plan(small, flash_prefill)
        plan = quantize(plan, scheme, head_dim) if scheme else plan

    nodes, p = cluster.nodes, len(cluster.nodes)
    stage_kernel, stage_comm, stage_bytes, stage_nvlink, stage_flops = [], [], [], [], []
    by_kind: dict[str, float] = {}
    for s, node in enumerate(nodes):
        start = split.starts[s]
        works = [w for layer in plan.layers[start:start + split.layers[s]] for w in layer]
        works = (list(plan.pre) if s == 0 else []) + works + (
            list(plan.post) if s == p - 1 else [])
        k = c = b = nv = f = 0.0
        for w in works:
            cost = costs.work_cost(w, node.gpu, node.n_gpus, node.intra_link, cuda_graphs,
                                   allreduce_algorithm)
            k, c, b, nv = k + cost.kernel_s, c + cost.comm_s, b + cost.hbm_bytes, nv + (
                cost.link_sent_bytes)
            f += w.flops
            by_kind[w.kind] = by_kind.get(w.kind, 0.0) + cost.kernel_s
            if cost.comm_s:
                by_kind["tp_collectives"] = by_kind.get("tp_collectives", 0.0) + cost.comm_s
        stage_kernel.append(k)
        stage_comm.append(c)
        stage_bytes.append(b)
        stage_nvlink.append(nv)
        stage_flops.append(f)

    hops, hop_class, hop_pair_bytes, hop_gather = [], [], [], []
    for s in range(p - 1):
        cls, link = cluster.hop(s)
        a, b = nodes[s], nodes[s + 1]
        pairs = min(a.n_gpus, b.n_gpus)
        per_pair = plan.hidden_bytes / pairs
        # GPU pairs of two nodes (or of one node's stages) each carry a slice; a datacenter
        # link carries the whole residual stream.
        t = link.transfer_s(plan.hidden_bytes if cls == "interdc" else per_pair)
        gather = allgather(plan.hidden_bytes, b.n_gpus, b.intra_link)
        if b.n_gpus > 1:
            t += gather.time_s + costs.collective_overhead_s(b.gpu, cuda_graphs)
        t += costs.collective_overhead_s(a.gpu, cuda_graphs)
        hops.append(t)
        hop_class.append(cls)
        hop_pair_bytes.append(int(round(per_pair)))
        hop_gather.append(int(round(gather.total_bytes / b.n_gpus)) if b.n_gpus > 1 else 0)

    if hops:
        by_kind["pipeline_hops"] = sum(hops)
    # Decode is autoregressive: the next step's first stage embeds the ids the last stage
    # sampled, so they travel back over the hops, in reverse, before the step is over.
    back = []
    if g["phase"] == "decode":
        for s in range(p - 1):
            link = cluster.hop(s)[1]
            back.append(link.transfer_s(plan.rows * TOKEN_ID_BYTES)
                        + costs.collective_overhead_s(nodes[s + 1].gpu, cuda_graphs))
    if back:
        by_kind["token_return"] = sum(back)

    # Pipeline schedule in integer picoseconds.
    run_ps = [_ps(k) + _ps(c) for k, c in zip(stage_kernel, stage_comm, strict=True)]
    hop_ps = [_ps(h) for h in hops]
    done = [0] * p
    link_free = [0] * max(p - 1, 0)
    for _ in range(microbatches):
        arrive = 0
        for s in range(p):
            done[s] = max(done[s], arrive) + run_ps[s]
            if s < p - 1:
                link_free[s] = max(link_free[s], done[s]) + hop_ps[s]
                arrive = link_free[s]
    makespan = done[-1] + sum(_ps(t) for t in back)

    gpus, busy, hbm = [], [], []
    sent = {c: [] for c in LINK_CLASSES}
    recv = {c: [] for c in LINK_CLASSES}
    for r in range(cluster.replicas):
        for s, node in enumerate(nodes):
            for i in range(node.n_gpus):
                gpus.append(f"r{r}.s{s}.g{i}:{node.gpu.name}")
                busy.append(microbatches * _ps(stage_kernel[s]))
                hbm.append(int(round(microbatches * stage_bytes[s])))
                nv = int(round(microbatches * stage_nvlink[s]))
                row_sent = {"nvlink": nv, "internode": 0, "interdc": 0}
                row_recv = {"nvlink": nv, "internode": 0, "interdc": 0}
                if s < p - 1 and i < min(node.n_gpus, nodes[s + 1].n_gpus):
                    row_sent[hop_class[s]] += microbatches * hop_pair_bytes[s]
                if back and i == 0:  # the sampled ids, GPU 0 of each stage to the one before
                    if s > 0:
                        row_sent[hop_class[s - 1]] += microbatches * plan.rows * TOKEN_ID_BYTES
                    if s < p - 1:
                        row_recv[hop_class[s]] += microbatches * plan.rows * TOKEN_ID_BYTES
                if s > 0:
                    if i < min(node.n_gpus, nodes[s - 1].n_gpus):
                        row_recv[hop_class[s - 1]] += microbatches * hop_pair_bytes[s - 1]
                    row_sent["nvlink"] += microbatches * hop_gather[s - 1]
                    row_recv["nvlink"] += microbatches * hop_gather[s - 1]
                for c in LINK_CLASSES:
                    sent[c].append(row_sent[c])
                    recv[c].append(row_recv[c])
    idle = [makespan - b for b in busy]
    power = [n.gpu.power_w for n in nodes]
    energy = None
    if all(pw is not None for pw in power):
        energy = cluster.replicas * sum(
            n.gpu.power_w * n.n_gpus for n in nodes) * makespan / PS
    max_batch, max_ctx = _capacity_limits(graph, split)
    return ClusterResult(
        system=cluster.name, model=g["cfg"].name, phase=g["phase"], batch=g["batch"],
        ctx=g["ctx_len"] + g["seq_len"], seq_len=g["seq_len"], replicas=cluster.replicas,
        microbatches=microbatches, cuda_graphs=cuda_graphs, gpus=tuple(gpus),
        makespan_ps=makespan, busy_ps=tuple(busy), idle_ps=tuple(idle), hbm_bytes=tuple(hbm),
        sent_bytes={c: tuple(v) for c, v in sent.items()},
        recv_bytes={c: tuple(v) for c, v in recv.items()},
        stage_layers=split.layers, stage_kernel_s=tuple(stage_kernel),
        stage_comm_s=tuple(stage_comm), hop_s=tuple(hops), mem_per_gpu=split.mem_per_gpu,
        capacity=split.capacity, fits=reason is None, reason=reason, max_batch=max_batch,
        max_ctx=max_ctx, flops=cluster.replicas * microbatches * sum(stage_flops),
        energy_j=energy, time_by_kind_s=by_kind,
    )


def _capacity_limits(graph: nx.DiGraph, split) -> tuple[int, int]:
    """Largest batch at this ctx and longest ctx at this batch that fit, with this split.

    KV cache grows with batch x ctx and activations with batch; weights stay."""
    g = graph.graph
    batch, ctx = g["batch"], g["ctx_len"] + g["seq_len"]
    best_batch, best_ctx = None, None
    for w, kv, act, cap in zip(split.weight_per_gpu, split.kv_per_gpu, split.act_per_gpu,
                               split.capacity, strict=True):
        room = cap - w
        per_seq = (kv + act) / batch
        b = int(room // per_seq) if per_seq > 0 else 0
        kv_per_token = kv / ctx if ctx else 0.0
        c = int((room - act) // kv_per_token) if kv_per_token > 0 else 0
        best_batch = b if best_batch is None else min(best_batch, b)
        best_ctx = c if best_ctx is None else min(best_ctx, c)
    return max(best_batch or 0, 0), max(best_ctx or 0, 0)
