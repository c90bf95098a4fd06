"""The worker server against the `openai` client and raw HTTP: one real MoE engine process."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from http.client import HTTPConnection
from typing import Any
from urllib.parse import urlparse

import msgpack
import openai
import pytest
import zmq

from meshd.node_agent.engine.tokenizer import ByteTokenizer
from meshd.scheduler.kv_events import BlockRemoved, BlockStored, decode_batch

from .server_helpers import (
    SECRET,
    SMALL,
    ServerProc,
    http,
    make_prompt,
    make_server,
    metrics,
    wait_for,
)

MODEL = "meshd-tiny-moe"
LEASE_S = 3.0


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProc]:
    s = make_server("--moe", *SMALL, "--kv-events-port", "0", "--kv-replay-port", "0",
                    "--kv-secret", SECRET, "--lease-timeout-s", str(LEASE_S))
    yield s
    assert s.stop() == 0, "".join(s.lines[-20:])


@pytest.fixture(scope="module")
def client(srv: ServerProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)


def complete(srv: ServerProc, **body: Any) -> dict[str, Any]:
    status, out, _ = http(srv.url + "/v1/completions", {"model": MODEL, **body})
    assert status == 200, out
    return out  # type: ignore[no-any-return]


def test_completions_logprobs_usage_and_request_id(client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt="hello mesh", max_tokens=6, temperature=0, logprobs=3,
        extra_headers={"X-Request-Id": "req-123"})
    assert raw.headers["x-request-id"] == "req-123"
    out = raw.parse()
    assert out.id == "cmpl-req-123"
    c = out.choices[0]
    assert c.finish_reason == "length"
    assert c.logprobs is not None and len(c.logprobs.token_logprobs or []) == 6
    assert all(len(t) >= 1 for t in c.logprobs.top_logprobs or [])
    assert c.logprobs.text_offset == sorted(c.logprobs.text_offset or [])
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (11, 6)  # <bos> + 10 bytes
    assert out.usage.prompt_tokens_details is not None
    # the same prompt again hits the prefix cache? 11 tokens < one block: no cached tokens
    assert out.usage.prompt_tokens_details.cached_tokens == 0


def test_chat_n_seed_logprobs(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                          "max_tokens": 5, "n": 3, "seed": 7, "temperature": 1.0,
                          "logprobs": True, "top_logprobs": 2}
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    for c in a.choices:
        assert c.logprobs is not None and c.logprobs.content is not None
        assert len(c.logprobs.content) == 5
        assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
    assert a.usage is not None and a.usage.completion_tokens == 15


def test_stop_token_and_stop_string(srv: ServerProc) -> None:
    prompt = make_prompt(20, 1)
    ref = complete(srv, prompt=prompt, max_tokens=12, temperature=0, ignore_eos=True,
                   return_token_ids=True)["choices"][0]
    ids = ref["token_ids"]
    stop_id = ids[4]
    out = complete(srv, prompt=prompt, max_tokens=12, temperature=0, ignore_eos=True,
                   stop_token_ids=[stop_id], return_token_ids=True)["choices"][0]
    assert out["finish_reason"] == "stop" and out["stop_reason"] == stop_id
    assert out["token_ids"] == ids[:ids.index(stop_id) + 1]
    text = ref["text"]
    if len(text) >= 3:  # the random model may emit no printable bytes
        stop = text[1]
        out = complete(srv, prompt=prompt, max_tokens=12, temperature=0, ignore_eos=True,
                       stop=[stop])["choices"][0]
        assert out["finish_reason"] == "stop" and out["text"] == text[:text.index(stop)]


def test_async_streaming_matches_non_streaming(srv: ServerProc) -> None:
    async def run() -> tuple[str, Any, str]:
        ac = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        msgs = [{"role": "user", "content": "stream please"}]
        full = await ac.chat.completions.create(model=MODEL, messages=msgs,  # type: ignore
                                                max_tokens=10, temperature=0)
        stream = await ac.chat.completions.create(
            model=MODEL, messages=msgs, max_tokens=10, temperature=0, stream=True,  # type: ignore
            stream_options={"include_usage": True})
        parts, last = [], None
        async for chunk in stream:
            for ch in chunk.choices:
                parts.append(ch.delta.content or "")
            last = chunk
        await ac.close()
        return "".join(parts), last, full.choices[0].message.content or ""

    text, last, full_text = asyncio.run(run())
    assert text == full_text
    assert last is not None and last.choices == [] and last.usage.completion_tokens == 10


def test_sync_streaming_completions(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model=MODEL, prompt=make_prompt(10), max_tokens=4,
                                            temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.id == chunks[0].id for c in chunks)


BAD: list[tuple[str, str, Any, str | None]] = [
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "x"}, "model"),
    ("negative max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": -3}, "max_tokens"),
    ("absurd max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": 10**9}, "max_tokens"),
    ("over context", "/v1/completions", {"prompt": "y" * 300}, "prompt"),
    ("malformed json", "/v1/completions", b'{"prompt": "x",', None),
    ("wrong type temperature", "/v1/completions", {"prompt": "x", "temperature": "hot"},
     "temperature"),
    ("wrong type n", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                              "n": "2"}, "n"),
    ("messages not a list", "/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("not an object", "/v1/completions", [1, 2], None),
    ("bad token id", "/v1/completions", {"prompt": [1, 99999]}, "prompt"),
    ("top_logprobs without logprobs", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ("empty stop string", "/v1/completions", {"prompt": "x", "stop": ["a", ""]}, "stop"),
    ("seed past int64", "/v1/completions", {"prompt": "x", "seed": 2**63}, "seed"),
    ("top_p 0", "/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("presence_penalty past 2", "/v1/completions", {"prompt": "x", "presence_penalty": 2.5},
     "presence_penalty"),
    # bodies that made the worker answer 500 (issue 10): each is a clear 400 now
    ("lone surrogate", "/v1/completions", b'{"prompt": "\\ud800"}', None),
    ("lone surrogate in chat", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "a\\udfff"}]}', None),
    ("10k-deep JSON", "/v1/completions", b"[" * 10_000 + b"]" * 10_000, None),
    ("max_tokens 1e400", "/v1/completions", b'{"prompt": "x", "max_tokens": 1e400}', None),
    ("400-digit max_tokens", "/v1/completions",
     b'{"prompt": "x", "max_tokens": ' + b"9" * 400 + b"}", None),
    ("5000-digit seed", "/v1/completions", b'{"prompt": "x", "seed": ' + b"7" * 5000 + b"}",
     None),
    ("300-digit temperature", "/v1/completions",
     b'{"prompt": "x", "temperature": ' + b"9" * 300 + b"}", "temperature"),
    ("NaN", "/v1/completions", b'{"prompt": "x", "temperature": NaN}', None),
    ("invalid UTF-8", "/v1/completions", b'{"prompt": "\xff\xfe"}', None),
    ("empty body", "/v1/completions", b"", None),
]


@pytest.mark.parametrize(("case", "path", "body", "param"), BAD, ids=[b[0] for b in BAD])
def test_bad_requests_are_openai_400s(srv: ServerProc, case: str, path: str, body: Any,
                                      param: str | None) -> None:
    raw = body if isinstance(body, bytes) else None
    status, out, _ = http(srv.url + path, None if raw else body, raw=raw)
    assert status == 400, out
    assert set(out["error"]) == {"message", "type", "param", "code"}
    assert out["error"]["param"] == param and "Traceback" not in out["error"]["message"]
    assert http(srv.url + "/health")[0] == 200


def test_openai_client_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert client.models.list().data[0].id == MODEL


def test_client_disconnect_aborts_request(srv: ServerProc) -> None:
    before = metrics(srv.url).get("meshd_engine_aborts_total", 0)
    u = urlparse(srv.url)
    conn = HTTPConnection(u.hostname, u.port, timeout=30)
    body = {"model": MODEL, "prompt": "long", "max_tokens": 200, "ignore_eos": True,
            "stream": True, "temperature": 0}
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.fp.readline()  # the first event: generation is under way
    conn.sock.close()
    conn.close()

    def settled() -> bool:
        m = metrics(srv.url)
        return (m["meshd_engine_aborts_total"] > before and m["vllm:num_requests_running"] == 0)

    assert wait_for(settled, 15)
    assert http(srv.url + "/debug/kv")[1]["integrity"] == "ok"


def test_metrics_have_vllm_names_and_experts(srv: ServerProc) -> None:
    complete(srv, prompt="experts", max_tokens=2)
    m = metrics(srv.url)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries_total",
                 "vllm:prefix_cache_hits_total", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:num_preemptions_total",
                 "meshd_engine_kv_leases_held", "meshd_engine_kv_leases_expired_total"):
        assert name in m, name
    experts = {k: v for k, v in m.items() if k.startswith("meshd_engine_moe_expert_tokens")}
    assert len(experts) == 4 * 8 and sum(experts.values()) > 0


def test_prefill_params_lease_expiry_frees_blocks(srv: ServerProc) -> None:
    prompt = make_prompt(40, 2)
    kvp = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
           "remote_block_ids": None, "remote_host": None, "remote_port": None}
    status, out, hdrs = http(srv.url + "/v1/completions",
                             {"model": MODEL, "prompt": prompt, "max_tokens": 1,
                              "kv_transfer_params": kvp}, headers={"X-Request-Id": "p1"})
    assert status == 200 and hdrs["X-Request-Id"] == "p1"
    p = out["kv_transfer_params"]
    assert set(p) >= {"do_remote_prefill", "do_remote_decode", "remote_engine_id",
                      "remote_block_ids", "remote_request_id", "remote_host", "remote_port",
                      "tp_size"}
    assert (p["do_remote_prefill"], p["do_remote_decode"], p["tp_size"]) == (True, False, 1)
    assert p["remote_request_id"].startswith("p1-") and p["remote_request_id"] != "p1"
    assert len(p["remote_block_ids"]) == 3 and p["remote_port"] == srv.kv_port
    assert out["meshd"]["experts"], "MoE prefill reports the prompt's top experts"
    kv = http(srv.url + "/debug/kv")[1]
    assert (kv["leases"], kv["held"]) == (1, 1)
    assert kv["free_blocks"] <= kv["num_blocks"] - 3
    time.sleep(LEASE_S + 0.3)
    kv = wait_for(lambda: (lambda k: k if k["held"] == 0 else None)(
        http(srv.url + "/debug/kv")[1]), 5)
    assert kv and kv["leases"] == 0 and kv["integrity"] == "ok"
    assert kv["free_blocks"] == kv["num_blocks"]
    assert metrics(srv.url)["meshd_engine_kv_leases_expired_total"] >= 1


def test_prefill_that_stops_returns_no_params(srv: ServerProc) -> None:
    prompt = make_prompt(40, 3)
    first = complete(srv, prompt=prompt, max_tokens=1, temperature=0,
                     return_token_ids=True)["choices"][0]["token_ids"][0]
    out = complete(srv, prompt=prompt, max_tokens=1, temperature=0, stop_token_ids=[first],
                   kv_transfer_params={"do_remote_decode": True})
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["kv_transfer_params"] is None
    kv = http(srv.url + "/debug/kv")[1]
    assert (kv["held"], kv["leases"]) == (0, 0)


def test_kv_events_match_block_table_and_replay(srv: ServerProc) -> None:
    assert srv.events is not None
    ctx: zmq.Context[Any] = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVTIMEO, 5000)
    sub.connect(srv.events)
    time.sleep(0.3)  # PUB/SUB slow joiner
    try:
        complete(srv, prompt=make_prompt(50, 4), max_tokens=2)
        live = [sub.recv_multipart()]
        while sub.poll(300):
            live.append(sub.recv_multipart())
        seqs = [int.from_bytes(f[1], "big") for f in live]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        # replay everything from 0 ("after a gap") and rebuild the prefix cache from events
        req = ctx.socket(zmq.DEALER)
        req.setsockopt(zmq.RCVTIMEO, 5000)
        assert srv.replay is not None
        req.connect(srv.replay)
        req.send_multipart([b"", (0).to_bytes(8, "big")])
        replayed: dict[int, bytes] = {}
        while True:
            _, seq_b, payload = req.recv_multipart()
            seq = int.from_bytes(seq_b, "big", signed=True)
            if seq == -1:
                break
            replayed[seq] = payload
        req.close(linger=0)
        assert sorted(replayed) == list(range(len(replayed)))
        assert all(replayed[s] == f[2] for s, f in zip(seqs, live, strict=True))
        cached: set[int] = set()
        for seq in sorted(replayed):
            for ev in decode_batch(seq, replayed[seq]).events:
                if isinstance(ev, BlockStored):
                    cached.update(ev.block_hashes)
                elif isinstance(ev, BlockRemoved):
                    cached.difference_update(ev.block_hashes)
                else:
                    cached.clear()
        assert sorted(cached) == http(srv.url + "/debug/kv")[1]["cached_block_hashes"]
        assert msgpack.unpackb(live[0][2])["events"]
    finally:
        sub.close(linger=0)
        ctx.destroy(linger=0)



def test_chat_logprobs_as_token_ids(client: openai.OpenAI) -> None:
    """`return_tokens_as_token_ids`: tokens are named `token_id:<id>`, so the top 5 are 5
    distinct entries even where several decode alike (partial UTF-8 bytes all decode to
    U+FFFD); `bytes` are each token's own, with or without the flag."""
    tok = ByteTokenizer()
    kw: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "bytes"}],
                          "max_tokens": 8, "temperature": 0, "logprobs": True,
                          "top_logprobs": 5, "extra_body": {"ignore_eos": True}}
    plain = client.chat.completions.create(**kw)
    kw["extra_body"] = {"ignore_eos": True, "return_tokens_as_token_ids": True}
    named = client.chat.completions.create(**kw)
    a, b = plain.choices[0].logprobs, named.choices[0].logprobs
    assert a is not None and b is not None and a.content and b.content
    for x, y in zip(a.content, b.content, strict=True):
        tid = int(y.token.removeprefix("token_id:"))
        assert x.token == tok.decode([tid]) and x.bytes == y.bytes == list(tok.token_bytes(tid))
        tops = [int(t.token.removeprefix("token_id:")) for t in y.top_logprobs]
        assert len(set(tops)) == 5
        assert [t.logprob for t in y.top_logprobs] == sorted(
            (t.logprob for t in y.top_logprobs), reverse=True)
        assert [t.bytes for t in x.top_logprobs] == [list(tok.token_bytes(t)) for t in tops]
    text = plain.choices[0].message.content
    assert bytes(v for e in a.content for v in (e.bytes or [])).decode("utf-8", "replace") == text


def test_completion_logprobs_as_token_ids_stream_and_not(srv: ServerProc) -> None:
    tok = ByteTokenizer()
    body = {"prompt": make_prompt(12, 5), "max_tokens": 8, "temperature": 0, "logprobs": 3,
            "ignore_eos": True, "return_token_ids": True, "return_tokens_as_token_ids": True}
    c = complete(srv, **body)["choices"][0]
    lp, ids = c["logprobs"], c["token_ids"]
    assert lp["tokens"] == [f"token_id:{t}" for t in ids]
    assert all(3 <= len(top) <= 4 and all(k.startswith("token_id:") for k in top)
               for top in lp["top_logprobs"])
    lens = [len(tok.decode([t])) for t in ids]  # offsets count the text, not the names
    assert lp["text_offset"] == [sum(lens[:i]) for i in range(len(ids))]
    status, text, _ = http(srv.url + "/v1/completions", {"model": MODEL, **body, "stream": True})
    assert status == 200
    chunks = [json.loads(line[6:]) for line in text.splitlines()
              if line.startswith("data: {")]
    offsets = [o for ch in chunks for o in (ch["choices"][0]["logprobs"] or {}).get(
        "text_offset", [])]
    assert offsets == lp["text_offset"]
