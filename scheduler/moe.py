"""MoE placement model: which worker hosts which experts (and how many replicas).

Built from an EPLB `phy2log` map (slots split evenly over GPUs) and the GPU -> worker (or EP
group) assignment, or from per-worker expert sets (`from_worker_sets`: the agent's
`[workers] experts`); `worker_experts()` gives the sets that end up in `WorkerView.experts`,
which the expert-affinity scorer reads. Plain data; `check_integrity()` for tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class ExpertPlacement:
    num_experts: int  # logical experts per layer
    gpu_worker: tuple[str, ...]  # GPU index -> worker id (several GPUs may form one EP group)
    slots: tuple[tuple[tuple[int, ...], ...], ...]  # [layer][gpu] -> logical experts held

    @staticmethod
    def from_phy2log(phy2log: npt.ArrayLike, num_experts: int, gpu_worker: Sequence[str]
                     ) -> ExpertPlacement:
        p = np.asarray(phy2log, dtype=np.int64)
        if p.ndim == 1:
            p = p[None, :]
        gpus = len(gpu_worker)
        if p.shape[1] % gpus:
            raise ValueError(f"moe: {p.shape[1]} slots do not split over {gpus} GPUs")
        per = p.shape[1] // gpus
        slots = tuple(tuple(tuple(int(e) for e in layer[g * per:(g + 1) * per])
                            for g in range(gpus)) for layer in p)
        return ExpertPlacement(num_experts, tuple(gpu_worker), slots)

    @staticmethod
    def from_worker_sets(num_experts: int, sets: Mapping[str, Iterable[int]],
                         num_layers: int = 1) -> ExpertPlacement:
        """Each worker (one slot group) holds `sets[worker]` in every one of `num_layers`
        layers. Raises ValueError for an id outside 0..num_experts-1 or an expert no worker
        holds."""
        if num_experts < 1 or num_layers < 1:
            raise ValueError("moe: num_experts and num_layers must be >= 1")
        workers = tuple(sets)
        held = tuple(tuple(sorted({int(e) for e in sets[w]})) for w in workers)
        for w, experts in zip(workers, held, strict=True):
            bad = [e for e in experts if not 0 <= e < num_experts]
            if bad:
                raise ValueError(f"moe: worker {w}: experts {bad} outside 0..{num_experts - 1}")
        placement = ExpertPlacement(num_experts, workers, (held,) * num_layers)
        missing = placement.unplaced()
        if missing:
            raise ValueError(f"moe: experts {missing} are hosted by no worker")
        return placement

    def unplaced(self, layer: int = 0) -> list[int]:
        """Logical experts no GPU holds in `layer` (empty for a complete placement)."""
        held = {e for experts in self.slots[layer] for e in experts}
        return [e for e in range(self.num_experts) if e not in held]

    def worker_experts(self, layer: int | None = None) -> dict[str, frozenset[int]]:
        """Worker -> experts it hosts (in `layer`, or in every layer when None)."""
        out: dict[str, set[int]] = {}
        layers = range(len(self.slots)) if layer is None else [layer]
        for li in layers:
            per_worker: dict[str, set[int]] = {}
            for g, experts in enumerate(self.slots[li]):
                per_worker.setdefault(self.gpu_worker[g], set()).update(experts)
            for w, es in per_worker.items():
                out[w] = out.get(w, es) & es if layer is None else es
        return {w: frozenset(es) for w, es in out.items()}

    def replicas(self, layer: int = 0) -> Mapping[int, int]:
        """Logical expert -> number of physical replicas in `layer`."""
        counts: dict[int, int] = {}
        for experts in self.slots[layer]:
            for e in experts:
                counts[e] = counts.get(e, 0) + 1
        return counts

    def check_integrity(self) -> None:
        for li, layer in enumerate(self.slots):
            assert len(layer) == len(self.gpu_worker), f"layer {li}: GPU count"
            held = {e for experts in layer for e in experts}
            assert held == set(range(self.num_experts)), f"layer {li}: experts not all placed"
