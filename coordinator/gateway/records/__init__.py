"""The gateway's local store of finished requests: one raw record per request for a few days,
hourly rollups per (tenant, model) for months (`store.RecordStore`); the rollups' latency
histograms are pure data (`rollup`)."""
