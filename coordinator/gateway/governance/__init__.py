"""Governance at the gateway's admission stage: tenants from credentials, token and spend
budgets reserved before a request runs and settled when it ends, fleet-wide through the ledger
(`coordinator/ledger_actor.py`), fair share under saturation, the runaway-loop breaker. The
decisions themselves are pure (`meshd.scheduler.admission`); this package wires them to
requests, the ledger and metrics. See docs/governance.md."""
