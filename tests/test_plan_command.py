"""`meshd plan`'s inputs: the window of every replica's request records (real record stores),
and the running split from the node table."""

from __future__ import annotations

import time
from pathlib import Path

from meshd.commands.plan import split_of, window_requests, workers_of
from meshd.coordinator.gateway.records.record import RequestRecord
from meshd.coordinator.gateway.records.store import RecordStore
from meshd.proto.v1 import control_pb2 as pb


def make_record(rid: str, t: float, prompt: int, cached: int, out: int, model: str = "m",
                outcome: str = "ok") -> RequestRecord:
    return RequestRecord(rid, "0" * 32, t, "", model, "chat", outcome, 200, "local", prompt,
                         cached, out, 0.1, 0.5, "", "w", "n", 0, 1)


def test_the_window_is_every_replicas_records_of_the_model(tmp_path: Path) -> None:
    now = time.time()
    for replica, recs in enumerate([
            [make_record("a", now - 10, 100, 50, 8), make_record("old", now - 900, 10, 0, 1)],
            [make_record("b", now - 5, 300, 0, 0), make_record("x", now - 4, 9, 0, 9, "other"),
             make_record("f", now - 3, 9, 0, 9, outcome="error")]]):
        store = RecordStore(tmp_path / f"gateway-{replica}.db")
        for r in recs:
            store.add(r)
        store.flush()
        store.close()
    reqs, hits = window_requests(tmp_path, "m", now - 60)
    assert [(r.request_id, r.input_tokens, r.output_tokens) for r in reqs] == [
        ("a", 100, 8), ("b", 300, 1)]  # sorted by start; an empty output counts one token
    assert hits == 50 / 400
    assert window_requests(tmp_path / "none", "m", 0) == ([], 0.0)


def test_the_running_split_is_read_from_the_alive_nodes() -> None:
    reply = pb.StatusReply(nodes=[
        pb.NodeStatus(node_id="n1", state="alive", workers=[
            pb.WorkerInfo(worker_id="n1-p0", role=pb.WORKER_ROLE_PREFILL, model="m"),
            pb.WorkerInfo(worker_id="n1-d1", role=pb.WORKER_ROLE_DECODE, model="m"),
            pb.WorkerInfo(worker_id="n1-b2", role=pb.WORKER_ROLE_BOTH, model="other")]),
        pb.NodeStatus(node_id="n2", state="dead", workers=[
            pb.WorkerInfo(worker_id="n2-d0", role=pb.WORKER_ROLE_DECODE, model="m")])])
    workers = workers_of(reply, "m")
    assert workers == [("n1", "n1-d1", "decode"), ("n1", "n1-p0", "prefill")]
    assert split_of(workers) == (1, 1, 0)
