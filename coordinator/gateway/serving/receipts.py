"""Receipts at the gateway: which requests get one, what each choice's run recorded, and the
signed receipt built from them (the format and the offline check: `meshd/receipts.py`).

A request gets a receipt when its tenant's policy says `receipts = true` or the client sends
`x-meshd-receipt: true` (`false` turns a tenant's default off for one request). Its choice
runs then record a `Segment` per decode stream (worker, node, first token index) and ask the
workers that can sign (the embedded engine, launched by the agent with the node key) to attest
their output; `build` puts the prompt digest, each choice's text digest and segments with the
nodes' attestations, token counts, tenant and times together and signs them with the gateway's
receipt key (one Ed25519 signature per response, ~30-50 µs of CPU; the rest is digests and
JSON).

The receipt key is `[gateway.receipts] key_file` (under the coordinator's state dir when
deployed with it, so every replica signs with the same key), created on first start; without
one a replica signs with a key of its own, published like the file's.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nacl.signing import SigningKey
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from meshd import receipts
from meshd.coordinator.gateway.governance.metrics import CpuSample
from meshd.coordinator.gateway.http.errors import ApiError

if TYPE_CHECKING:
    from meshd.coordinator.gateway.serving.choice import ChoiceRun
    from meshd.coordinator.gateway.serving.shapes import ChoiceOutput

log = logging.getLogger("meshd.gateway.receipts")
HEADER = b"x-meshd-receipt"
# The header carries a receipt up to this size (one choice is ~2 KB); a larger one (many
# choices) is in the body only: common HTTP clients cap a response's header block at 16 KiB.
MAX_HEADER_BYTES = 8192
# worker id -> (its node id, whether it attests its outputs): what a run asks of the pool
Provenance = Callable[[str], tuple[str, bool]]


@dataclass(slots=True)
class Segment:
    """One decode stream of a choice: on `worker_id` (of `node_id`) from token `start` on,
    with the node's attestation of what it produced when it sent one."""

    worker_id: str
    node_id: str
    start: int
    attestation: dict[str, Any] | None = None


def wanted(header: str, tenant_default: bool) -> bool:
    """Whether a request gets a receipt: its `x-meshd-receipt` header, else its tenant's."""
    if not header:
        return tenant_default
    value = header.strip().lower()
    if value in ("true", "1", "on", "yes"):
        return True
    if value in ("false", "0", "off", "no"):
        return False
    raise ApiError(400, f"x-meshd-receipt must be true or false, got {header[:40]!r}.",
                   code="invalid_receipt_header")


def load_key(path: str) -> SigningKey:
    """The receipt key at `path` (created 0600 on first start), or a fresh in-memory one."""
    if not path:
        log.info("no [gateway.receipts] key_file: this replica signs receipts with a key of "
                 "its own (published at /v1/meshd/keys)")
        return SigningKey.generate()
    from meshd.node_agent import identity

    p = Path(path).expanduser()
    return identity.load_or_create(p.parent, p.name).signing_key


class ReceiptSigner:
    """The replica's receipt key, what it signed, and what signing cost (timed in place)."""

    def __init__(self, key: SigningKey) -> None:
        self.key = key
        public = bytes(key.verify_key)
        self.key_id = receipts.gateway_key_id(public)
        self.public_hex = public.hex()
        self.issued = 0
        self.failed = 0
        self.cpu = CpuSample()

    def published(self) -> dict[str, Any]:
        """This key as `GET /v1/meshd/keys` lists it."""
        return {"key_id": self.key_id, "public_key": self.public_hex, "algorithm": "ed25519",
                "revoked_at_ms": None}

    def build(self, *, request_id: str, response_id: str, model: str, tenant: str | None,
              created_ms: int, prompt_ids: Sequence[int], runs: Sequence[ChoiceRun],
              outputs: Sequence[ChoiceOutput]) -> dict[str, Any] | None:
        """The signed receipt of a finished response; None (logged, counted) if a worker's
        output cannot be digested (the response is served without one)."""
        t0 = self.cpu.start()
        try:
            body = {"v": receipts.VERSION, "id": f"rcpt-{request_id}", "request_id": request_id,
                    "response_id": response_id, "model": model, "tenant": tenant,
                    "created_ms": created_ms, "completed_ms": receipts.now_ms(),
                    "prompt": {"sha256": receipts.ids_digest(prompt_ids),
                               "tokens": len(prompt_ids),
                               "cached_tokens": max((o.cached_tokens for o in outputs),
                                                    default=0)},
                    "choices": [_choice(i, r, o) for i, (r, o) in
                                enumerate(zip(runs, outputs, strict=True))]}
            out = receipts.sign_receipt(self.key, body)
        except receipts.ReceiptError as e:
            self.failed += 1
            log.warning("request %s: no receipt: %s", request_id, e)
            return None
        self.issued += 1
        if t0:
            self.cpu.stop(t0)
        return out

    def register(self, registry: CollectorRegistry) -> None:
        registry.register(_Collector(self))

    def describe(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "issued": self.issued, "failed": self.failed,
                "cost_us": {"build": self.cpu.mean_us(), "samples": self.cpu.samples,
                            "every": self.cpu.EVERY}}


class _Collector(Collector):
    def __init__(self, signer: ReceiptSigner) -> None:
        self.signer = signer

    def collect(self) -> Any:
        c = CounterMetricFamily("meshd_receipts", "Signed receipts: issued, or failed (a "
                                "worker's output could not be digested; served without one).",
                                labels=["outcome"])
        c.add_metric(["issued"], self.signer.issued)
        c.add_metric(["failed"], self.signer.failed)
        yield c


def _choice(index: int, run: ChoiceRun, out: ChoiceOutput) -> dict[str, Any]:
    ids = out.token_ids
    segs = run.segments
    rows = []
    for k, s in enumerate(segs):
        end = segs[k + 1].start if k + 1 < len(segs) else len(ids)
        if end == s.start and s.attestation is None:
            continue  # a stream that failed before its first token produced nothing
        rows.append({"worker_id": s.worker_id, "node_id": s.node_id, "start": s.start,
                     "tokens": end - s.start,
                     "output_sha256": receipts.ids_digest(ids[s.start:end]),
                     "attestation": s.attestation})
    pre = run.prefilled_on
    return {"index": index, "finish_reason": out.finish_reason,
            "completion_tokens": len(ids),
            "text_sha256": receipts.text_digest("".join(out.text)),
            "prefill": None if pre is None else {"worker_id": pre[0], "node_id": pre[1]},
            "segments": rows}


def attestation_of(meshd: Any, choice: int = 0) -> dict[str, Any] | None:
    """The worker's attestation of `choice` in a chunk's `meshd` object, if it sent one."""
    if not isinstance(meshd, Mapping):
        return None
    for att in meshd.get("attestations") or ():
        if isinstance(att, dict) and att.get("choice") == choice:
            return att
    return None


def header_value(receipt: Mapping[str, Any]) -> bytes:
    """The receipt as the `x-meshd-receipt` response header carries it: base64url of its
    canonical JSON, unpadded."""
    return base64.urlsafe_b64encode(receipts.canonical(receipt)).rstrip(b"=")
