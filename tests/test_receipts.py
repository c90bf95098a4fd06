"""Issue 12 §2: the receipt format and its offline check (`meshd/receipts.py`), table-driven.

A receipt is built here as the gateway builds one (the node attests its segment, the gateway
signs the whole); every single change to text, counts, node ids, digests or signatures must
make it fail, and so must a node key revoked before it signed, an unknown key, or a key set
whose ids do not match its keys. The live path (real gateway, real engines) is
tests/coordinator/gateway/serving/test_receipts_live.py.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from nacl.signing import SigningKey

from meshd import receipts
from meshd.receipts import KeySet, ReceiptError

PROMPT = list(range(1000, 1040))
OUT = [7, 8, 9, 10, 11, 12]
TEXT = "héllo, wörld"
NODE_P, NODE_D1, NODE_D2, GATEWAY = (SigningKey(bytes([i]) * 32) for i in range(1, 5))


def node_id(key: SigningKey) -> str:
    return receipts.node_id_for(bytes(key.verify_key))


def make(continued: bool = False, at_ms: int = 1_000_000) -> dict[str, Any]:
    """A signed receipt of one choice decoded on D1 (and, `continued`, finished on D2)."""
    cut = 4 if continued else len(OUT)
    segs = []
    for key, start, end in ((NODE_D1, 0, cut), (NODE_D2, cut, len(OUT))):
        if start == end:
            continue
        att = receipts.attest(key, model="m", request_id="r1-d", choice=0,
                              prompt_ids=PROMPT + OUT[:start], output_ids=OUT[start:end],
                              finish_reason="length" if end == len(OUT) else None,
                              at_ms=at_ms + start)
        segs.append({"worker_id": f"w-{start}", "node_id": node_id(key), "start": start,
                     "tokens": end - start, "output_sha256": receipts.ids_digest(OUT[start:end]),
                     "attestation": att})
    body = {"v": 1, "id": "rcpt-r1", "request_id": "r1", "response_id": "chatcmpl-r1",
            "model": "m", "tenant": "acme", "created_ms": at_ms - 50, "completed_ms": at_ms + 90,
            "prompt": {"sha256": receipts.ids_digest(PROMPT), "tokens": len(PROMPT),
                       "cached_tokens": 0},
            "choices": [{"index": 0, "finish_reason": "length", "completion_tokens": len(OUT),
                         "text_sha256": receipts.text_digest(TEXT),
                         "prefill": {"worker_id": "p0", "node_id": node_id(NODE_P)},
                         "segments": segs}]}
    return receipts.sign_receipt(GATEWAY, body)


def keys(revoked: dict[str, int] | None = None) -> KeySet:
    revoked = revoked or {}
    doc = {"gateways": [{"key_id": receipts.gateway_key_id(bytes(GATEWAY.verify_key)),
                         "public_key": bytes(GATEWAY.verify_key).hex()}],
           "nodes": [{"node_id": node_id(k), "public_key": bytes(k.verify_key).hex(),
                      "revoked_at_ms": revoked.get(node_id(k))}
                     for k in (NODE_P, NODE_D1, NODE_D2)]}
    return KeySet.from_json(doc)


def test_a_receipt_verifies_with_its_text() -> None:
    for continued in (False, True):
        r = make(continued)
        result = receipts.verify(r, keys(), {0: TEXT})
        assert result.ok, result.problems
        assert result.notes == []
    bare = receipts.verify(make(), keys())
    assert bare.ok and bare.notes == ["response text not checked (no response given)"]


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(r: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        obj: Any = r
        for p in parents:
            obj = obj[int(p)] if p.isdigit() else obj[p]
        obj[int(last) if last.isdigit() else last] = value
    return change


SEG = "choices.0.segments.0"
TAMPER = {  # each one change; the gateway's signature or the nodes' must catch it
    "completion tokens": _set("choices.0.completion_tokens", 5),
    "prompt tokens": _set("prompt.tokens", 41),
    "model": _set("model", "m2"),
    "tenant": _set("tenant", "other"),
    "finish reason": _set("choices.0.finish_reason", "stop"),
    "segment node id": _set(f"{SEG}.node_id", node_id(NODE_D2)),
    "segment token count": _set(f"{SEG}.tokens", 5),
    "segment digest": _set(f"{SEG}.output_sha256", receipts.ids_digest([1, 2])),
    "prefill node": _set("choices.0.prefill.node_id", node_id(NODE_D2)),
    "attested token count": _set(f"{SEG}.attestation.output_tokens", 5),
    "attested output": _set(f"{SEG}.attestation.output_sha256", receipts.ids_digest([1])),
    "attested node id": _set(f"{SEG}.attestation.node_id", node_id(NODE_D2)),
    "attested time": _set(f"{SEG}.attestation.at_ms", 1),
    "gateway signature": _set("signature", "00" * 64),
    "node signature": _set(f"{SEG}.attestation.signature", "00" * 64),
    "no attestation": _set(f"{SEG}.attestation", None),
    "gateway key": _set("gateway.key_id", "g-0000000000000000"),
}


@pytest.mark.parametrize("name", sorted(TAMPER))
def test_one_change_and_it_does_not_verify(name: str) -> None:
    r = copy.deepcopy(make())
    TAMPER[name](r)
    result = receipts.verify(r, keys(), {0: TEXT})
    assert not result.ok, name


def test_a_changed_text_does_not_verify() -> None:
    r = make()
    for text in ("héllo, wörld!", "hello, wörld", "", TEXT + " "):
        result = receipts.verify(r, keys(), {0: text})
        assert result.problems == ["choice 0: the text does not match the receipt's digest"]
    assert not receipts.verify(r, keys(), {0: TEXT, 1: "x"}).ok  # a choice it does not cover


def test_a_node_a_gateway_did_re_sign_is_still_caught_by_its_attestation() -> None:
    """The gateway's signature alone is not the proof: a receipt re-signed after its segment
    was moved to another node still fails on the node's own signature."""
    r = copy.deepcopy(make())
    seg = r["choices"][0]["segments"][0]
    seg["node_id"] = seg["attestation"]["node_id"] = node_id(NODE_D2)
    resigned = receipts.sign_receipt(GATEWAY, {k: v for k, v in r.items()
                                               if k not in ("gateway", "signature")})
    result = receipts.verify(resigned, keys(), {0: TEXT})
    assert any("signature does not match" in p for p in result.problems), result.problems


def test_a_revoked_node_verifies_before_its_revocation_and_not_after() -> None:
    at = 1_000_000
    r = make(at_ms=at)
    d1 = node_id(NODE_D1)
    assert receipts.verify(r, keys({d1: at + 10_000}), {0: TEXT}).ok  # revoked later
    for revoked in (at - 1, at + 10):  # before it signed; after it signed, before the receipt
        result = receipts.verify(r, keys({d1: revoked}), {0: TEXT})
        assert any("signed after its key was revoked" in p for p in result.problems), revoked
    pre = receipts.verify(r, keys({node_id(NODE_P): at}), {0: TEXT})
    assert pre.problems == [f"choice 0: prefill node {node_id(NODE_P)!r} was revoked before "
                            f"this receipt"]


def test_an_unattested_segment_fails_unless_allowed() -> None:
    r = copy.deepcopy(make())
    r["choices"][0]["segments"][0]["attestation"] = None
    r = receipts.sign_receipt(GATEWAY, {k: v for k, v in r.items()
                                        if k not in ("gateway", "signature")})
    strict = receipts.verify(r, keys(), {0: TEXT})
    assert len(strict.problems) == 1 and "not attested" in strict.problems[0]
    lenient = receipts.verify(r, keys(), {0: TEXT}, allow_unattested=True)
    assert lenient.ok and "not attested" in lenient.notes[0]


def test_malformed_receipts_are_problems_not_exceptions() -> None:
    for bad in ({}, {"v": 1}, {"v": 2}, {**make(), "choices": "x"},
                {**make(), "completed_ms": "soon"}):
        assert not receipts.verify(bad, keys()).ok


def test_a_key_set_must_match_its_ids() -> None:
    good = bytes(NODE_D1.verify_key).hex()
    for doc in ({"nodes": [{"node_id": "n-0000000000000000", "public_key": good}]},
                {"nodes": [{"node_id": node_id(NODE_D1), "public_key": "zz"}]},
                {"nodes": "all"}, {"gateways": [{"key_id": "g-1", "public_key": good}]}, []):
        with pytest.raises(ReceiptError):
            KeySet.from_json(doc)  # type: ignore[arg-type]


def test_load_reads_a_body_a_stream_capture_and_a_bare_receipt() -> None:
    r = make()
    body = {"id": "chatcmpl-r1", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": TEXT}}], "meshd": {"receipt": r}}
    got, texts = receipts.load(orjson.dumps(body))
    assert got == r and texts == {0: TEXT}
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
              {"choices": [{"index": 0, "delta": {"content": TEXT[:3]}}]},
              {"choices": [{"index": 0, "delta": {"content": TEXT[3:]}}]},
              {"choices": [], "usage": {"prompt_tokens": 40}},
              {"choices": [], "meshd": {"receipt": r}}]
    sse = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    got, texts = receipts.load(sse)
    assert got == r and texts == {0: TEXT}
    completions = {"choices": [{"index": 0, "text": TEXT}], "meshd": {"receipt": r}}
    assert receipts.load(orjson.dumps(completions))[1] == {0: TEXT}
    assert receipts.load(orjson.dumps(r)) == (r, None)
    for bad in (b"not json", b"[1]", orjson.dumps({"choices": []}), b"data: {}\n\n"):
        with pytest.raises(ReceiptError):
            receipts.load(bad)


def test_digests_are_fixed_and_bounded() -> None:
    assert receipts.ids_digest([]) == \
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert receipts.ids_digest([1]) != receipts.ids_digest([256])  # 4 bytes each, ordered
    for bad in ([-1], [2**32]):
        with pytest.raises(ReceiptError):
            receipts.ids_digest(bad)
