"""A real worker process for supervisor tests: serves `GET /health` for `life` seconds."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from meshd.capabilities import Worker
from meshd.node_agent.supervisor import WorkerSpec
from support.net import free_port

SERVER = """
import http.server, os, sys, threading, time
port, life = int(sys.argv[1]), float(sys.argv[2])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
srv = http.server.HTTPServer(("127.0.0.1", port), H)
threading.Thread(target=srv.serve_forever, daemon=True).start()
print("serving", os.getpid(), flush=True)
time.sleep(life)
"""


def health_worker(tmp: Path, life: float, **kw: float) -> WorkerSpec:
    """Worker "w0": a Python process on a free loopback port that exits after `life` s."""
    port = free_port()
    script = tmp / "srv.py"
    script.write_text(SERVER)
    return WorkerSpec(Worker("w0", f"http://127.0.0.1:{port}", "both", "tiny"),
                      (sys.executable, str(script), str(port), str(life)),
                      f"http://127.0.0.1:{port}/health", health_interval_s=0.2, **kw)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
