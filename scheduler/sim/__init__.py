"""Trace-driven discrete-event simulator for routing policies (pure Python, simulated clock).

    trace = load_mooncake(path, speedup=4.0, limit=2000)
    router = Router(decode=builtin("least_loaded"))
    result = Simulator(ClusterConfig.colocated(8), router, router.index).run(trace)
    print(summarize(result, trace))

Modules: `trace` (loaders, block hashes), `cost` (analytic cost model, calibration), `cache`
(per-worker LRU block pool emitting KV events), `engine` (one continuous-batching worker),
`cluster` (cluster shape, `WorkerView` snapshots), `sim` (event loop), `records`, `metrics`,
`policies` (the named policy set the comparison runs), `moe` (the MoE scenario: requests with
expert statistics, the expert hit rate). See docs/simulator.md.
"""

from meshd.scheduler.sim.cluster import ClusterConfig
from meshd.scheduler.sim.metrics import Summary, ideal_hit_rate, summarize
from meshd.scheduler.sim.records import RequestRecord, WorkerStats
from meshd.scheduler.sim.sim import RoutingPolicy, SimResult, Simulator
from meshd.scheduler.sim.timing import EngineTiming, calibrate, h100_llama3_8b
from meshd.scheduler.sim.trace import TraceRequest, block_hashes, load, load_csv, load_mooncake

__all__ = [
    "ClusterConfig", "EngineTiming", "RequestRecord", "RoutingPolicy", "SimResult", "Simulator",
    "Summary", "TraceRequest", "WorkerStats", "block_hashes", "calibrate", "h100_llama3_8b",
    "ideal_hit_rate", "load", "load_csv", "load_mooncake", "summarize",
]
