"""`meshd receipt verify FILE`: check a signed receipt offline (docs/trust.md "Receipts").

FILE is what a client saved: a non-streamed response body with `meshd.receipt`, an SSE capture
of a streamed one (`curl -N ... > out.sse`), or a bare receipt (then only the signatures are
checked, not the text). The keys come from `--keys FILE` (a saved `GET /v1/meshd/keys`), else
from the gateway at gateway.host:gateway.port with `--api-key` / `MESHD_API_KEY`. Exit 0 when the
receipt verifies, 1 when it does not (each problem printed) or cannot be checked (why).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from meshd import env, receipts
from meshd.commands import CommandError, gateway_get
from meshd.config import MeshConfig

PATH = "/v1/meshd/keys"
TIMEOUT_S = 10.0


def _keys(args: argparse.Namespace, cfg: MeshConfig) -> dict[str, Any]:
    if args.keys:
        try:
            doc = json.loads(Path(args.keys).read_text())
        except (OSError, ValueError) as e:
            raise CommandError(f"--keys {args.keys}: {e}") from None
        return doc if isinstance(doc, dict) else {}
    key = args.api_key or env.api_key()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    reply = gateway_get(cfg.gateway.host, cfg.gateway.port, PATH, headers, TIMEOUT_S)
    if reply.why or not isinstance(reply.body, dict):
        raise CommandError(f"gateway {reply.address}: cannot read {PATH} "
                           f"({reply.why or 'not a JSON object'}); pass --keys FILE with the "
                           f"mesh's published keys, or point gateway.host/port at a gateway")
    return reply.body


def run(args: argparse.Namespace, cfg: MeshConfig) -> int:
    try:
        raw = Path(args.file).read_bytes()
    except OSError as e:
        raise CommandError(f"{args.file}: {e}") from None
    try:
        receipt, texts = receipts.load(raw)
        keys = receipts.KeySet.from_json(_keys(args, cfg))
    except receipts.ReceiptError as e:
        raise CommandError(f"{args.file}: {e}") from None
    result = receipts.verify(receipt, keys, texts, allow_unattested=args.allow_unattested)
    if args.json:
        print(json.dumps({"ok": result.ok, "receipt": receipt.get("id"),
                          "problems": result.problems, "notes": result.notes}, indent=2))
    else:
        what = receipt.get("id", "receipt")
        print(f"{what}: {'verified' if result.ok else 'NOT verified'}")
        for p in result.problems:
            print(f"  problem: {p}")
        for n in result.notes:
            print(f"  note: {n}")
    return 0 if result.ok else 1
