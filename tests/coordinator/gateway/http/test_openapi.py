"""The served OpenAPI document is valid 3.1 and lists exactly the routes the server serves."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from openapi_spec_validator import validate

from meshd.coordinator.gateway.http import routes
from meshd.coordinator.gateway.http.openapi import SPEC


def test_spec_is_valid_openapi_31() -> None:
    validate(SPEC)
    assert SPEC["openapi"].startswith("3.1")


def test_spec_matches_routes(stack: Any) -> None:
    with urllib.request.urlopen(stack.url + "/openapi.json", timeout=5) as r:
        served_spec = json.loads(r.read())
    assert served_spec == json.loads(json.dumps(SPEC))
    documented = {(m, p) for p, ops in SPEC["paths"].items() for m in ops}
    assert documented == routes.served()
