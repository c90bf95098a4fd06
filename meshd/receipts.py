"""Signed inference receipts: what a node attests it produced, what the gateway signs over a
whole response, and the offline check a client runs on one (docs/trust.md "Receipts").

Two kinds of Ed25519 signature chain a completion to the keys the coordinator trusts:

- An **attestation**, by the node whose worker decoded: the digest of the prompt token ids it
  was given and of the token ids it produced, their counts, the model, the node id and the
  time (`attest`). The worker signs with the node's own key (`<agent state>/node.key`, the key
  its capability reports are signed with), so it proves which node produced which tokens.
- A **receipt**, by the gateway (`sign_receipt`): request digest (the prompt token ids),
  each choice's text digest, token counts, finish reason, prefill node and decode segments
  with their attestations, model, tenant and timestamps. A choice continued on another worker
  after a failure has one segment per worker, in order.

`verify` checks a receipt against the keys the mesh publishes (`GET /v1/meshd/keys`): the
gateway's signature, the nodes' attestations (each node known by its key, its id derived from
that key, not revoked when it signed), the segments adding up, and, given the response, each
choice's text. Everything signed is canonical JSON (sorted keys, no whitespace, UTF-8) of
strings, integers, lists and null (times are integer milliseconds), prefixed by a context line
so that one kind of signature can never pass for the other.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from meshd.node_agent.identity import node_id_for

ATTESTATION_CONTEXT = b"meshd-attestation-v1\n"
RECEIPT_CONTEXT = b"meshd-receipt-v1\n"
VERSION = 1


class ReceiptError(ValueError):
    """Something to be signed or checked is malformed; the message says what."""


def canonical(obj: Any) -> bytes:
    """The bytes a signature covers: sorted keys, no whitespace, UTF-8."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def ids_digest(ids: Sequence[int]) -> str:
    """SHA-256 (hex) of token ids as little-endian unsigned 32-bit integers."""
    try:
        return hashlib.sha256(struct.pack(f"<{len(ids)}I", *ids)).hexdigest()
    except struct.error:
        raise ReceiptError("token ids must be integers in [0, 2**32)") from None


def text_digest(text: str) -> str:
    """SHA-256 (hex) of the text's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def gateway_key_id(public_key: bytes) -> str:
    """A gateway receipt key's id: `g-` + the first 16 hex digits of sha256(public key)."""
    return "g-" + hashlib.sha256(public_key).hexdigest()[:16]


def now_ms() -> int:
    return int(time.time() * 1000)


# -- signing ----------------------------------------------------------------------------------

def attest(key: SigningKey, *, model: str, request_id: str, choice: int,
           prompt_ids: Sequence[int], output_ids: Sequence[int], finish_reason: str | None,
           at_ms: int | None = None) -> dict[str, Any]:
    """The node's signed statement that it produced `output_ids` from `prompt_ids`."""
    public = bytes(key.verify_key)
    statement: dict[str, Any] = {
        "v": VERSION, "node_id": node_id_for(public), "model": model,
        "request_id": request_id, "choice": choice,
        "prompt_sha256": ids_digest(prompt_ids), "prompt_tokens": len(prompt_ids),
        "output_sha256": ids_digest(output_ids), "output_tokens": len(output_ids),
        "finish_reason": finish_reason, "at_ms": now_ms() if at_ms is None else at_ms}
    sig = key.sign(ATTESTATION_CONTEXT + canonical(statement)).signature
    return {**statement, "signature": bytes(sig).hex()}


def sign_receipt(key: SigningKey, receipt: Mapping[str, Any]) -> dict[str, Any]:
    """`receipt` (without `gateway` and `signature`) signed by the gateway's key."""
    public = bytes(key.verify_key)
    body = {**receipt, "gateway": {"key_id": gateway_key_id(public), "public_key": public.hex()}}
    body.pop("signature", None)
    sig = key.sign(RECEIPT_CONTEXT + canonical(body)).signature
    return {**body, "signature": bytes(sig).hex()}


# -- checking ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PublishedKey:
    """One key of `GET /v1/meshd/keys`: a node's or a gateway's, and when it was revoked."""

    key_id: str
    public_key: bytes
    revoked_at_ms: int | None = None

    def valid_at(self, at_ms: int) -> bool:
        return self.revoked_at_ms is None or at_ms < self.revoked_at_ms


@dataclass(frozen=True, slots=True)
class KeySet:
    """The mesh's published keys, by node id and by gateway key id."""

    nodes: Mapping[str, PublishedKey] = field(default_factory=dict)
    gateways: Mapping[str, PublishedKey] = field(default_factory=dict)

    @staticmethod
    def from_json(doc: Mapping[str, Any]) -> KeySet:
        """Parse a `GET /v1/meshd/keys` document; raises ReceiptError naming what is wrong."""
        def keys(rows: Any, what: str, id_field: str, derive: Any) -> dict[str, PublishedKey]:
            if not isinstance(rows, list):
                raise ReceiptError(f"keys: {what} must be a list")
            out = {}
            for row in rows:
                try:
                    public = bytes.fromhex(row["public_key"])
                    revoked = row.get("revoked_at_ms")
                    key = PublishedKey(str(row[id_field]), public,
                                       None if revoked is None else int(revoked))
                except (KeyError, TypeError, ValueError, AttributeError):
                    raise ReceiptError(f"keys: malformed {what} entry {row!r:.120}") from None
                if len(public) != 32 or derive(public) != key.key_id:
                    raise ReceiptError(f"keys: {what} entry {key.key_id!r} does not match its "
                                       f"public key")
                out[key.key_id] = key
            return out

        if not isinstance(doc, Mapping):
            raise ReceiptError("keys: not a JSON object")
        return KeySet(keys(doc.get("nodes", []), "nodes", "node_id", node_id_for),
                      keys(doc.get("gateways", []), "gateways", "key_id", gateway_key_id))


@dataclass(slots=True)
class Verification:
    """What `verify` found: `ok` when nothing is wrong; `problems` says what is, `notes` what
    was not checked (no response text given, unattested segments allowed)."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _signature_ok(public: bytes, context: bytes, body: Mapping[str, Any], sig_hex: Any) -> bool:
    try:
        VerifyKey(public).verify(context + canonical(body), bytes.fromhex(sig_hex))
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


def _unsigned(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != "signature"}


def verify(receipt: Mapping[str, Any], keys: KeySet,
           texts: Mapping[int, str] | None = None,
           allow_unattested: bool = False) -> Verification:
    """Check `receipt` against the mesh's `keys`; `texts` (choice index -> the text the client
    received) checks the response too. Never raises on a malformed receipt: it is a problem."""
    out = Verification()
    try:
        _verify(receipt, keys, texts, allow_unattested, out)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        out.problems.append(f"malformed receipt ({type(e).__name__}: {e})")
    return out


def _verify(receipt: Mapping[str, Any], keys: KeySet, texts: Mapping[int, str] | None,
            allow_unattested: bool, out: Verification) -> None:
    if receipt.get("v") != VERSION:
        out.problems.append(f"unknown receipt version {receipt.get('v')!r}")
        return
    gw = receipt["gateway"]
    completed = int(receipt["completed_ms"])
    known = keys.gateways.get(gw["key_id"])
    if known is None or known.public_key.hex() != gw["public_key"]:
        out.problems.append(f"gateway key {gw['key_id']!r} is not one the mesh publishes")
    elif not known.valid_at(completed):
        out.problems.append(f"gateway key {gw['key_id']!r} was revoked before this receipt")
    elif not _signature_ok(known.public_key, RECEIPT_CONTEXT, _unsigned(receipt),
                           receipt.get("signature")):
        out.problems.append("the gateway's signature does not match the receipt")
    prompt = receipt["prompt"]
    choices = receipt["choices"]
    if texts is not None:
        if sorted(texts) != sorted(int(c["index"]) for c in choices):
            out.problems.append(f"the response has choices {sorted(texts)}, the receipt "
                                f"{sorted(int(c['index']) for c in choices)}")
    else:
        out.notes.append("response text not checked (no response given)")
    for c in choices:
        _verify_choice(c, receipt, prompt, keys, texts, allow_unattested, out)


def _verify_choice(c: Mapping[str, Any], receipt: Mapping[str, Any], prompt: Mapping[str, Any],
                   keys: KeySet, texts: Mapping[int, str] | None, allow_unattested: bool,
                   out: Verification) -> None:
    i = int(c["index"])
    where = f"choice {i}"
    if texts is not None and i in texts and text_digest(texts[i]) != c["text_sha256"]:
        out.problems.append(f"{where}: the text does not match the receipt's digest")
    pos = 0
    for k, seg in enumerate(c["segments"]):
        at = f"{where} segment {k}"
        if int(seg["start"]) != pos:
            out.problems.append(f"{at}: starts at token {seg['start']}, expected {pos}")
        pos = int(seg["start"]) + int(seg["tokens"])
        att = seg.get("attestation")
        if att is None:
            msg = f"{at}: not attested by node {seg['node_id'] or '?'} ({seg['worker_id']})"
            (out.notes if allow_unattested else out.problems).append(msg)
            continue
        _verify_attestation(att, seg, receipt, prompt, keys, at, out)
    if pos != int(c["completion_tokens"]):
        out.problems.append(f"{where}: segments add up to {pos} tokens, the receipt says "
                            f"{c['completion_tokens']}")
    pre = c.get("prefill")
    if pre and pre.get("node_id"):
        node = keys.nodes.get(pre["node_id"])
        if node is None:
            out.problems.append(f"{where}: prefill node {pre['node_id']!r} is not one the mesh "
                                f"publishes")
        elif not node.valid_at(int(receipt["completed_ms"])):
            out.problems.append(f"{where}: prefill node {pre['node_id']!r} was revoked before "
                                f"this receipt")


def _verify_attestation(att: Mapping[str, Any], seg: Mapping[str, Any],
                        receipt: Mapping[str, Any], prompt: Mapping[str, Any], keys: KeySet,
                        at: str, out: Verification) -> None:
    node = keys.nodes.get(att["node_id"])
    for name, want in (("node_id", seg["node_id"] or att["node_id"]),
                       ("output_sha256", seg["output_sha256"]),
                       ("output_tokens", seg["tokens"]), ("model", receipt["model"])):
        if att[name] != want:
            out.problems.append(f"{at}: the node attested {name} {att[name]!r}, the receipt "
                                f"says {want!r}")
    if int(seg["start"]) == 0 and att["prompt_sha256"] != prompt["sha256"]:
        out.problems.append(f"{at}: the node attested another prompt than the receipt's")
    if node is None:
        out.problems.append(f"{at}: node {att['node_id']!r} is not one the mesh publishes")
    elif not (node.valid_at(int(att["at_ms"])) and node.valid_at(int(receipt["completed_ms"]))):
        # the node's own time, and the gateway's (a stolen key can backdate the former)
        out.problems.append(f"{at}: node {att['node_id']!r} signed after its key was revoked")
    elif not _signature_ok(node.public_key, ATTESTATION_CONTEXT, _unsigned(att),
                           att.get("signature")):
        out.problems.append(f"{at}: node {att['node_id']!r}'s signature does not match")


# -- reading what a client saved --------------------------------------------------------------

def from_response(obj: Mapping[str, Any]) -> tuple[Mapping[str, Any], dict[int, str]]:
    """(receipt, texts) from a non-streamed chat or completions response body."""
    receipt = (obj.get("meshd") or {}).get("receipt")
    if not isinstance(receipt, Mapping):
        raise ReceiptError("the response carries no meshd.receipt")
    texts = {}
    for c in obj.get("choices") or ():
        msg = c.get("message")
        texts[int(c["index"])] = (msg.get("content") or "") if msg is not None else \
            (c.get("text") or "")
    return receipt, texts


def from_stream(events: Iterable[Mapping[str, Any]]) -> tuple[Mapping[str, Any], dict[int, str]]:
    """(receipt, texts) from a streamed response's chunks, in order."""
    texts: dict[int, list[str]] = {}
    receipt = None
    for ev in events:
        for c in ev.get("choices") or ():
            delta = c.get("delta")
            part = (delta.get("content") or "") if delta is not None else (c.get("text") or "")
            texts.setdefault(int(c["index"]), []).append(part)
        found = (ev.get("meshd") or {}).get("receipt")
        if found is not None:
            receipt = found
    if not isinstance(receipt, Mapping):
        raise ReceiptError("the stream carries no meshd.receipt chunk")
    return receipt, {i: "".join(parts) for i, parts in texts.items()}


def load(raw: bytes) -> tuple[Mapping[str, Any], dict[int, str] | None]:
    """(receipt, texts or None) from a saved file: a response body, an SSE capture of a
    streamed one (`data:` lines), or a bare receipt (texts None: only signatures checked)."""
    text = raw.decode("utf-8", "replace").strip()
    if text.startswith("data:") or "\ndata:" in text:
        events = []
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                events.append(orjson.loads(line[5:].strip()))
        return from_stream(events)
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ReceiptError(f"not JSON or an SSE capture ({e})") from None
    if not isinstance(obj, dict):
        raise ReceiptError("not a JSON object")
    if "signature" in obj and "gateway" in obj and "prompt" in obj:  # a bare receipt
        return obj, None
    if "choices" in obj:
        return from_response(obj)
    raise ReceiptError("neither a response with meshd.receipt nor a receipt")
