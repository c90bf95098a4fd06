"""meshd: a distributed mesh inference coordinator.

The root package holds what every component shares: the config (`meshd.config`), the single
module that reads `MESHD_*` environment variables (`meshd.env`), Ray bootstrap (`meshd.raylocal`)
and the `meshd` CLI (`meshd.cli`). Components live in `meshd.coordinator`, `meshd.node_agent`,
`meshd.kv_transfer`, `meshd.scheduler` and `meshd.proto`; see docs/architecture.md.
"""

__version__ = "0.1.0"
