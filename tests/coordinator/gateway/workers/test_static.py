"""Static workers behind a token: the token file is read and checked, and discovery carries it
to the worker (its `/v1/models`) and into the member's record (every later call)."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web

from meshd.coordinator.gateway.workers.static import discover_static, static_token

TOKEN = "static-token-0123456789"


def test_the_token_file_is_read_and_checked(tmp_path: Path) -> None:
    assert static_token("") == ""
    f = tmp_path / "tok"
    f.write_text(TOKEN + "\nignored\n")
    assert static_token(str(f)) == TOKEN
    for bad in ("", "short\n", "has a space in it 0123\n"):
        f.write_text(bad)
        with pytest.raises(ValueError, match=r"gateway\.static_workers_token_file"):
            static_token(str(f))
    with pytest.raises(ValueError, match=r"gateway\.static_workers_token_file"):
        static_token(str(tmp_path / "missing"))


async def test_discovery_sends_the_token_and_the_member_keeps_it() -> None:
    seen: list[str] = []

    async def models(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": {"message": "Unauthorized"}}, status=401)
        return web.json_response({"data": [{"id": "tiny"}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        url = f"prefill=http://127.0.0.1:{port}"
        assert await discover_static([url]) == []  # refused without the token: skipped
        (m,) = await discover_static([url], api_token=TOKEN)
        assert (m.worker.role, m.worker.model, m.worker.api_token) == ("prefill", "tiny", TOKEN)
        assert seen == ["", f"Bearer {TOKEN}"]
    finally:
        await runner.cleanup()
