"""EPLB-style expert rebalancer (after DeepSeek's EPLB): replicate hot experts, pack to GPUs.

Given per-layer per-logical-expert load `weight[L, E]`, it returns for each MoE layer which
logical expert every physical slot holds (`phy2log[L, R]`, slots `g*R/gpus ... (g+1)*R/gpus-1`
live on GPU g), the slots of each logical expert (`log2phy[L, E, X]`, -1 padded) and replica
counts (`logcnt[L, E]`). Hierarchical when expert groups divide evenly over nodes (groups packed
to nodes first so group-limited routing stays intra-node, then replication and packing inside each
node); global otherwise (one group, one node). Pure numpy; per-layer loops (E is small).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


class EPLBResult(NamedTuple):
    phy2log: IntArray  # [L, R]
    log2phy: IntArray  # [L, E, max replicas], -1 padded
    logcnt: IntArray  # [L, E]
    balancedness_before: float  # mean over layers of mean/max GPU load, 1.0 is perfect
    balancedness_after: float


def balanced_packing(weight: FloatArray, num_packs: int) -> tuple[IntArray, IntArray]:
    """Items into `num_packs` packs of exactly n/num_packs items each, heaviest first into the
    lightest pack that still has room. Returns (pack of each item, rank inside its pack)."""
    n = weight.shape[0]
    if n % num_packs:
        raise ValueError(f"balanced_packing: {n} items do not split into {num_packs} packs")
    per_pack = n // num_packs
    pack = np.full(n, -1, dtype=np.int64)
    rank = np.full(n, -1, dtype=np.int64)
    loads = [0.0] * num_packs
    counts = [0] * num_packs
    for item in np.argsort(-weight, kind="stable"):
        p = min((i for i in range(num_packs) if counts[i] < per_pack), key=loads.__getitem__)
        pack[item], rank[item] = p, counts[p]
        loads[p] += float(weight[item])
        counts[p] += 1
    return pack, rank


def replicate_experts(weight: FloatArray, num_phy: int) -> tuple[IntArray, IntArray, IntArray]:
    """Add replicas one at a time to the expert with the highest load per replica.
    Returns (phy2log [num_phy], replica rank [num_phy], logcnt [num_log])."""
    num_log = weight.shape[0]
    if num_phy < num_log:
        raise ValueError(f"replicate_experts: {num_phy} slots < {num_log} experts")
    phy2log = np.concatenate([np.arange(num_log), np.zeros(num_phy - num_log, np.int64)])
    rank = np.zeros(num_phy, dtype=np.int64)
    logcnt = np.ones(num_log, dtype=np.int64)
    for i in range(num_log, num_phy):
        e = int(np.argmax(weight / logcnt))
        phy2log[i], rank[i] = e, logcnt[e]
        logcnt[e] += 1
    return phy2log.astype(np.int64), rank, logcnt


def _layer(w: FloatArray, num_phy: int, groups: int, nodes: int, gpus: int
           ) -> tuple[IntArray, IntArray, IntArray]:
    num_log = w.shape[0]
    gsize = num_log // groups
    # 1. groups -> nodes; relabel experts so node k owns "middle" ids [k*E/nodes, (k+1)*E/nodes)
    gpack, grank = balanced_packing(w.reshape(groups, gsize).sum(1), nodes)
    log2mlog = (((gpack * (groups // nodes) + grank) * gsize)[:, None]
                + np.arange(gsize)).reshape(-1)
    mlog2log = np.argsort(log2mlog)
    per_node_log, per_node_phy = num_log // nodes, num_phy // nodes
    per_gpu = num_phy // gpus
    phy2log = np.empty(num_phy, dtype=np.int64)
    phyrank = np.empty(num_phy, dtype=np.int64)
    mlogcnt = np.empty(num_log, dtype=np.int64)
    for k in range(nodes):
        mids = mlog2log[k * per_node_log:(k + 1) * per_node_log]  # logical ids on node k
        # 2. replicate inside the node; 3. pack its physical experts onto its GPUs
        p2m, prank, cnt = replicate_experts(w[mids], per_node_phy)
        mlogcnt[k * per_node_log:(k + 1) * per_node_log] = cnt
        pack, rank = balanced_packing((w[mids] / cnt)[p2m], gpus // nodes)
        slot = k * per_node_phy + pack * per_gpu + rank
        phy2log[slot] = mids[p2m]
        phyrank[slot] = prank
    logcnt = mlogcnt[log2mlog]
    return phy2log, phyrank, logcnt


def gpu_loads(weight: FloatArray, phy2log: IntArray, logcnt: IntArray, gpus: int) -> FloatArray:
    """[L, gpus] load per GPU, each replica taking an equal share of its expert's load."""
    share = np.take_along_axis(weight / logcnt, phy2log, axis=1)
    return share.reshape(weight.shape[0], gpus, -1).sum(2)


def balancedness(loads: FloatArray) -> float:
    """Mean over layers of mean/max load per GPU (1.0: perfectly balanced)."""
    peak = loads.max(1)
    ratio = np.where(peak > 0, loads.mean(1) / np.where(peak > 0, peak, 1.0), 1.0)
    return float(ratio.mean())


def rebalance_experts(weight: npt.ArrayLike, num_replicas: int, num_groups: int,
                      num_nodes: int, num_gpus: int) -> EPLBResult:
    """DeepSeek EPLB contract; "before" is the default placement (expert e on GPU e*gpus//E,
    no replicas)."""
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError("rebalance_experts: weight must be [layers, experts]")
    layers, num_log = w.shape
    for cond, msg in ((num_replicas % num_gpus == 0, "num_replicas must be a multiple of gpus"),
                      (num_gpus % num_nodes == 0, "num_gpus must be a multiple of num_nodes"),
                      (num_log % num_groups == 0, "experts must divide into num_groups"),
                      (num_replicas >= num_log, "num_replicas must be >= experts")):
        if not cond:
            raise ValueError(f"rebalance_experts: {msg}")
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1  # global policy
    out = [_layer(w[i], num_replicas, num_groups, num_nodes, num_gpus) for i in range(layers)]
    phy2log = np.stack([o[0] for o in out])
    phyrank = np.stack([o[1] for o in out])
    logcnt = np.stack([o[2] for o in out])
    maxcnt = int(logcnt.max())
    log2phy = np.full((layers, num_log, maxcnt), -1, dtype=np.int64)
    for i in range(layers):
        log2phy[i, phy2log[i], phyrank[i]] = np.arange(num_replicas)
    home = np.arange(num_log) * num_gpus // num_log
    before_loads = np.zeros((layers, num_gpus))
    for i in range(layers):
        np.add.at(before_loads[i], home, w[i])
    before = balancedness(before_loads)
    after = balancedness(gpu_loads(w, phy2log, logcnt, num_gpus))
    return EPLBResult(phy2log, log2phy, logcnt, before, after)
