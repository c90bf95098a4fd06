"""The Responses API's memory: two replicas sharing one SQLite file see each other's responses,
a tenant never sees another's, the store keeps at most `max_entries` (newest kept) and
forgets a response after `ttl_s`; a missing one is 404 naming `previous_response_id`."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from meshd.coordinator.gateway.config import Limits
from meshd.coordinator.gateway.dialects.model import Completion
from meshd.coordinator.gateway.http.api_request import ApiRequest, Endpoint
from meshd.coordinator.gateway.http.dialect_requests import parse_responses
from meshd.coordinator.gateway.http.errors import ApiError
from meshd.coordinator.gateway.serving.responses_memory import ResponsesMemory


def make_request(text: str, tenant: str | None = None, prev: str | None = None) -> ApiRequest:
    obj: dict[str, object] = {"model": "m", "input": text}
    if prev is not None:
        obj["previous_response_id"] = prev
    body, dialect = parse_responses(obj, Limits())
    return ApiRequest(Endpoint.RESPONSES, "r", body, obj, b"", tenant, 0.0, dialect=dialect)


async def store(mem: ResponsesMemory, rid: str, text: str, answer: str,
                tenant: str | None = None) -> None:
    req = await mem.resolve(make_request(text, tenant))
    await mem.keep(req, SimpleNamespace(id=rid, completion=Completion(answer)))


def texts(req: ApiRequest) -> list[str]:
    return [m.content or "" for m in req.body.messages]  # type: ignore[union-attr]


async def test_replicas_share_the_file_and_tenants_are_apart(tmp_path: Path) -> None:
    a, b = (ResponsesMemory(tmp_path / "responses.sqlite") for _ in range(2))
    await store(a, "resp_1", "first question", "first answer", tenant="acme")
    follow = await b.resolve(make_request("second", "acme", prev="resp_1"))  # the other replica
    assert texts(follow) == ["first question", "first answer", "second"]
    with pytest.raises(ApiError) as e:
        await b.resolve(make_request("second", "other", prev="resp_1"))
    assert (e.value.status, e.value.param) == (404, "previous_response_id")


async def test_the_store_is_bounded_and_forgets_after_its_ttl(tmp_path: Path) -> None:
    mem = ResponsesMemory(tmp_path / "r.sqlite", max_entries=2)
    for i in range(3):
        await store(mem, f"resp_{i}", f"q{i}", f"a{i}")
    with pytest.raises(ApiError):  # the oldest went
        await mem.resolve(make_request("x", prev="resp_0"))
    assert texts(await mem.resolve(make_request("x", prev="resp_2")))[:2] == ["q2", "a2"]
    short = ResponsesMemory(tmp_path / "s.sqlite", ttl_s=-1.0)  # expired as it is written
    await store(short, "resp_9", "q", "a")
    with pytest.raises(ApiError):
        await short.resolve(make_request("x", prev="resp_9"))


async def test_without_a_file_each_replica_keeps_its_own() -> None:
    mem = ResponsesMemory(None)
    await store(mem, "resp_1", "q", "a")
    assert texts(await mem.resolve(make_request("x", prev="resp_1"))) == ["q", "a", "x"]
    assert mem.describe()["backend"] == "memory"


async def test_a_response_not_stored_cannot_be_continued(tmp_path: Path) -> None:
    mem = ResponsesMemory(tmp_path / "r.sqlite")
    obj = {"model": "m", "input": "q", "store": False}
    body, dialect = parse_responses(obj, Limits())
    req = ApiRequest(Endpoint.RESPONSES, "r", body, obj, b"", None, 0.0, dialect=dialect)
    await mem.keep(await mem.resolve(req), SimpleNamespace(id="resp_x",
                                                           completion=Completion("a")))
    with pytest.raises(ApiError):
        await mem.resolve(make_request("x", prev="resp_x"))


@pytest.mark.parametrize("shared", [True, False])
async def test_get_and_delete_answer_the_owner_only(tmp_path: Path, shared: bool) -> None:
    mem = ResponsesMemory(tmp_path / "r.sqlite" if shared else None)
    req = await mem.resolve(make_request("q", "acme"))
    await mem.keep(req, SimpleNamespace(id="resp_1", completion=Completion("a"),
                                        final={"id": "resp_1", "object": "response"}))
    assert await mem.item("GET", "resp_1", "acme") == {"id": "resp_1", "object": "response"}
    for method in ("GET", "DELETE"):
        with pytest.raises(ApiError) as e:
            await mem.item(method, "resp_1", "other")
        assert e.value.status == 404
    assert (await mem.item("DELETE", "resp_1", "acme"))["deleted"] is True
    with pytest.raises(ApiError):
        await mem.item("GET", "resp_1", "acme")
