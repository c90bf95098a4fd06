"""Where finished requests go: spans to an OTLP collector, rows to the request record store.

`TraceSink.add(trace)` is the request path's only cost (an append to a bounded queue; a full
queue drops the oldest and counts it). A daemon thread wakes every `export_interval_s`, settles
each trace, gives the record store its row (every request) and turns the sampled ones into
spans (`spans.py`) for the exporter, in batches: OTLP over HTTP/protobuf when
`[gateway.tracing] otlp_endpoint` is set (opentelemetry-exporter-otlp), an injected one in
tests. Export failures are counted and logged once per minute, never raised into serving.
`close` handles what is left within its deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from meshd.coordinator.gateway.records.store import RecordStore
from meshd.coordinator.gateway.tracing.spans import request_spans
from meshd.coordinator.gateway.tracing.trace import RequestTrace

log = logging.getLogger("meshd.gateway.tracing")
BATCH = 512  # traces turned into spans and exported per call


def otlp_exporter(endpoint: str, headers: dict[str, str], timeout_s: float) -> SpanExporter:
    """OTLP/HTTP (protobuf) to `endpoint` (`http://collector:4318/v1/traces`)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=endpoint, headers=headers, timeout=timeout_s)


class TraceSink:
    def __init__(self, exporter: SpanExporter | None, resource: Resource,
                 node_of: Callable[[str], str] = lambda _w: "", max_queue: int = 10_000,
                 export_interval_s: float = 1.0, records: RecordStore | None = None) -> None:
        """`exporter` None: spans are not built; `records` None: no rows."""
        self.exporter, self.resource, self.node_of = exporter, resource, node_of
        self.records = records
        self.max_queue, self.interval = max_queue, export_interval_s
        self._queue: deque[RequestTrace] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.exported = self.dropped = self.failed = 0  # traces (exported: sampled ones)
        self._last_error_log = 0.0

    def add(self, trace: RequestTrace) -> None:
        """Queue a finished request: its record, and its spans if sampled."""
        if self.records is None and (self.exporter is None or not trace.ctx.sampled):
            return
        q = self._queue
        if len(q) >= self.max_queue:
            q.popleft()
            self.dropped += 1
        q.append(trace)

    def start(self) -> None:
        if (self.exporter is not None or self.records is not None) and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="meshd-trace-export",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self.interval)
            self._wake.clear()
            self.export_pending()

    def export_pending(self, deadline: float | None = None) -> int:
        """Handle what is queued, in batches (until `deadline`, monotonic); traces handled."""
        n = 0
        while self._queue and (deadline is None or time.monotonic() < deadline):
            batch: list[RequestTrace] = []
            while self._queue and len(batch) < BATCH:
                batch.append(self._queue.popleft())
            n += self._export(batch)
        return n

    def _export(self, batch: list[RequestTrace]) -> int:
        """Records for the batch's traces, spans for its sampled ones; traces handled."""
        spans = []
        sampled = 0
        exporter, records = self.exporter, self.records
        for t in batch:
            try:
                t.settle()
                if records is not None:
                    records.add(t.record(self.node_of))
                if exporter is not None and t.ctx.sampled:
                    spans.extend(request_spans(t, self.resource, self.node_of))
                    sampled += 1
            except Exception:  # one malformed trace never stops the others
                log.exception("request %s: its trace could not be handled", t.req.request_id)
                self.failed += 1
        if exporter is None or not spans:
            return len(batch)
        try:
            result = exporter.export(spans)
        except Exception as e:
            result = SpanExportResult.FAILURE
            self._error(f"{type(e).__name__}: {e}")
        if result is SpanExportResult.SUCCESS:
            self.exported += sampled
        else:
            self.failed += sampled
            self._error("the exporter reported a failure")
        return len(batch)

    def _error(self, why: str) -> None:
        now = time.monotonic()
        if now - self._last_error_log > 60:
            self._last_error_log = now
            log.warning("trace export failed (%s); %d traces failed so far", why, self.failed)

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self.exporter is not None:
            self.export_pending(time.monotonic() + timeout_s)
            self.exporter.shutdown()

    def describe(self) -> dict[str, Any]:
        return {"exporting": self.exporter is not None, "queued": len(self._queue),
                "exported": self.exported, "dropped": self.dropped, "failed": self.failed}
