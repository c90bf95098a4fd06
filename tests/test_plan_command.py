"""`meshd plan`'s inputs: the window of every replica's request records (real record stores),
and the running split from the node table."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshd.commands import CommandError, gateway_hostport
from meshd.commands.plan import change_state, split_of, window_requests, workers_of
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
             make_record("f", now - 3, 9, 0, 9, outcome="error"),
             make_record("ahead", now + 30, 9, 0, 9)]]):
        store = RecordStore(tmp_path / f"gateway-{replica}.db")
        for r in recs:
            store.add(r)
        store.flush()
        store.close()
    reqs, hits = window_requests(tmp_path, "m", now - 60, now)
    assert [(r.request_id, r.input_tokens, r.output_tokens) for r in reqs] == [
        ("a", 100, 8), ("b", 300, 1)]  # sorted by start; an empty output counts one token
    assert hits == 50 / 400
    assert window_requests(tmp_path / "none", "m", 0) == ([], 0.0)
    # a record dated ahead of now (a replica's clock) is out of the window; without a bound, in
    assert "ahead" in {r.request_id for r in window_requests(tmp_path, "m", now - 60)[0]}


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


def _node(workers: list[tuple[str, int]], pending: tuple[str, ...] = (), state: str = "alive"
          ) -> pb.StatusReply:
    """Node n1 with `workers` (id, role) of model m (an id ending in -x: of another model)."""
    return pb.StatusReply(nodes=[pb.NodeStatus(
        node_id="n1", state=state,
        workers=[pb.WorkerInfo(worker_id=w, role=r, model="other" if w.endswith("-x") else "m")
                 for w, r in workers],
        pending_roles=[pb.RoleChange(worker_id=w, role=pb.WORKER_ROLE_BOTH) for w in pending])])


def test_a_role_change_is_done_only_once_the_worker_is_back_in_its_new_role() -> None:
    """What `--apply` waits for before it asks the next worker: the node back to as many
    workers, one more in the asked role, the old one gone."""
    P, D, B = pb.WORKER_ROLE_PREFILL, pb.WORKER_ROLE_DECODE, pb.WORKER_ROLE_BOTH
    before = (2, 0)  # two workers of the model on n1, none in role both
    ask = ("m", "n1", "n1-p0", "both", before)
    assert change_state(_node([("n1-p0", P), ("n1-d1", D)], pending=("n1-p0",)), *ask) == \
        "asked"  # not taken yet
    assert change_state(_node([("n1-d1", D)]), *ask) == "asked"  # draining or restarting
    assert change_state(_node([("n1-b0", B), ("n1-d1", D)]), *ask) == "done"
    assert change_state(_node([("n1-p0", P), ("n1-d1", D)]), *ask) == "kept"  # did not drain
    assert change_state(_node([("n1-d1", D)], state="dead"), *ask) == "gone"
    assert change_state(pb.StatusReply(), *ask) == "gone"
    # another model's worker on the node does not stand in for the one restarting
    assert change_state(_node([("n1-d1", D), ("n1-x", B)]), *ask) == "asked"


def test_gateway_addresses() -> None:
    assert gateway_hostport("127.0.0.1:8000") == ("127.0.0.1", 8000)
    assert gateway_hostport("[::1]:9") == ("::1", 9)
    for bad in ("8000", "host:", "host:http", ":80", "h:70000"):
        with pytest.raises(CommandError, match="expected HOST:PORT"):
            gateway_hostport(bad)


def test_bad_planner_knobs_are_refused_before_anything_is_asked(tmp_path: Path) -> None:
    for argv, why in ((["--confirm-windows", "0"], "confirm_windows: must be >= 1"),
                      (["--min-gain", "-1"], "min_gain: must be >= 0"),
                      (["--itl", "0"], "itl_s: must be > 0")):
        proc = subprocess.run([sys.executable, "-m", "meshd", "plan", *argv, "--state-dir",
                               str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and why in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
