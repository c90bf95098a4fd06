"""The policy file, re-read when it changes: tenants, prices and caps change without a restart.

Every `reload_interval_s` the watcher compares the file's (mtime, size) with what it last
loaded; on a change it validates the whole policy and hands it to `apply`. A policy that does
not validate is refused as a whole: the one in force stays, the error is logged once and
counted (`meshd_governance_reload_errors_total`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

from meshd.coordinator.gateway.governance.config import GovernanceConfig, Policy
from meshd.coordinator.gateway.governance.metrics import GovernanceMetrics

log = logging.getLogger("meshd.gateway.governance")


class PolicyWatcher:
    def __init__(self, config: GovernanceConfig, apply: Callable[[Policy], None],
                 metrics: GovernanceMetrics) -> None:
        self.config, self.apply, self.metrics = config, apply, metrics
        self.reloads = 0
        self.last_error = ""
        self._seen = self._stamp()
        self._task: asyncio.Task[None] | None = None

    def _stamp(self) -> tuple[float, int] | None:
        try:
            st = os.stat(self.config.policy_file)
        except OSError:
            return None
        return st.st_mtime, st.st_size

    def start(self) -> None:
        if self.config.policy_file:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.reload_interval_s)
            self.check()

    def check(self) -> bool:
        """Reload if the file changed; True when a new policy was put in force."""
        stamp = self._stamp()
        if stamp == self._seen:
            return False
        self._seen = stamp
        try:
            policy = self.config.policy()
        except ValueError as e:
            self.metrics.reload_errors += 1
            if str(e) != self.last_error:
                log.error("policy reload refused, the policy in force stays: %s", e)
            self.last_error = str(e)
            return False
        self.apply(policy)
        self.reloads += 1
        self.last_error = ""
        log.info("policy reloaded from %s (%d tenants)", self.config.policy_file,
                 len(policy.tenants))
        return True
