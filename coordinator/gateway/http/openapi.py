"""The gateway's OpenAPI 3.1 description, as data. Served at GET /openapi.json.

Keep it true: tests validate it with openapi-spec-validator and compare its paths and methods
with `routes.ROUTES`. Request schemas mirror the checks in `openai_api.py`; fields not listed
are allowed (`additionalProperties`) and passed to the engines.
"""

from __future__ import annotations

from typing import Any

import orjson

_ERR = {"$ref": "#/components/responses/Error"}
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_RID = {"name": "X-Request-Id", "in": "header", "required": False,
        "description": "Echoed back; generated when absent.", "schema": {"type": "string"}}
_PRIVACY = {"name": "X-Meshd-Privacy", "in": "header", "required": False,
            "description": "sensitive: run only on nodes of the tenant's privacy classes "
                           "(docs/trust.md); auto (default): the gateway decides.",
            "schema": {"type": "string", "enum": ["sensitive", "auto"]}}
_HALT = {"name": "X-Meshd-Halt-Below", "in": "header", "required": False,
         "description": "Score token confidence and halt a choice (finish_reason "
                        "low_confidence) when its rolling mean falls below this; 0 scores "
                        "without halting.",
         "schema": {"type": "number", "minimum": 0, "exclusiveMaximum": 1}}
_RECEIPT = {"name": "X-Meshd-Receipt", "in": "header", "required": False,
            "description": "true: the response carries a signed receipt (meshd.receipt; also "
                           "this header on a non-streamed response, base64url JSON); false: "
                           "none even if the tenant's policy gives one (docs/trust.md).",
            "schema": {"type": "string", "enum": ["true", "false"]}}

_COMMON_PROPS: dict[str, Any] = {
    "model": {"type": "string", "minLength": 1},
    "stream": {"type": ["boolean", "null"]},
    "stream_options": {"type": ["object", "null"],
                       "properties": {"include_usage": {"type": "boolean"}}},
    "n": {"type": ["integer", "null"], "minimum": 1},
    "stop": {"oneOf": [{"type": "string", "minLength": 1}, {"type": "null"},
                       {"type": "array", "items": {"type": "string", "minLength": 1},
                        "maxItems": 4}]},
    "seed": {"type": ["integer", "null"], "minimum": -(2**63), "maximum": 2**63 - 1},
    "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
    "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
    "max_tokens": {"type": ["integer", "null"], "minimum": 1},
    "user": {"type": ["string", "null"]},
}

_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
_MESSAGE = {
    "type": "object", "required": ["role"],
    "properties": {
        "role": {"enum": ["system", "user", "assistant", "tool", "developer", "function"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "null"},
                              {"type": "array", "items": _TEXT_PART}]},
        "name": {"type": "string"}, "tool_call_id": {"type": "string"},
        "tool_calls": {"type": "array"},
    },
}

_CHAT_REQ = {
    "type": "object", "required": ["model", "messages"], "additionalProperties": True,
    "properties": {
        **_COMMON_PROPS,
        "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
        "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1},
        "logprobs": {"type": ["boolean", "null"]},
        "top_logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": 20},
        "tools": {"type": ["array", "null"]},
        "tool_choice": {"type": ["string", "object", "null"]},
        "response_format": {"type": ["object", "null"]},
    },
}

_COMPLETION_REQ = {
    "type": "object", "required": ["model", "prompt"], "additionalProperties": True,
    "properties": {
        **_COMMON_PROPS,
        "prompt": {"oneOf": [{"type": "string", "minLength": 1},
                             {"type": "array", "minItems": 1,
                              "items": {"type": "integer", "minimum": 0}}]},
        "logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": 20},
    },
}


def _generate(summary: str, schema_ref: str) -> dict[str, Any]:
    return {
        "summary": summary, "parameters": [_RID, _PRIVACY, _HALT, _RECEIPT],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": schema_ref}}}},
        "responses": {
            "200": {"description": "A completion (JSON), or SSE chunks when stream is true.",
                    "content": {"application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": {"type": "string"}}}},
            **{code: _ERR for code in ("400", "401", "413", "415", "429", "500", "502",
                                       "503", "504")},
        },
    }


def _get(summary: str, ctype: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"summary": summary, "responses": {
        "200": {"description": summary, "content": {ctype: {"schema": schema}}}}}


SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "meshd gateway", "version": "0.1.0",
             "description": "OpenAI-compatible API of the meshd coordinator."},
    "servers": [{"url": "/"}],
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                            "x-api-key": {"type": "apiKey", "in": "header",
                                          "name": "x-api-key"}},
        "schemas": {
            "ChatCompletionRequest": _CHAT_REQ,
            "CompletionRequest": _COMPLETION_REQ,
            "MessagesRequest": {"type": "object",
                                "required": ["model", "max_tokens", "messages"],
                                "properties": {"model": {"type": "string"},
                                               "max_tokens": {"type": "integer"},
                                               "messages": {"type": "array"},
                                               "system": {"type": ["string", "array"]},
                                               "tools": {"type": "array"},
                                               "stream": {"type": "boolean"}}},
            "ResponsesRequest": {"type": "object", "required": ["model"],
                                 "properties": {"model": {"type": "string"},
                                                "input": {"type": ["string", "array"]},
                                                "instructions": {"type": ["string", "null"]},
                                                "previous_response_id": {
                                                    "type": ["string", "null"]},
                                                "tools": {"type": "array"},
                                                "store": {"type": "boolean"},
                                                "stream": {"type": "boolean"}}},
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["message", "type", "param", "code"],
                "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                               "param": {"type": ["string", "null"]},
                               "code": {"type": ["string", "null"]}}}}},
        },
        "responses": {"Error": {"description": "OpenAI-shaped error", "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
    },
    "paths": {
        "/v1/chat/completions": {"post": {
            **_generate("Create a chat completion",
                        "#/components/schemas/ChatCompletionRequest"),
            "security": [{"bearer": []}]}},
        "/v1/completions": {"post": {
            **_generate("Create a completion", "#/components/schemas/CompletionRequest"),
            "security": [{"bearer": []}]}},
        "/v1/messages": {"post": {
            **_generate("Create a message (Anthropic Messages API; errors in Anthropic's "
                        "shape; `x-api-key` or a bearer token; docs/api.md)",
                        "#/components/schemas/MessagesRequest"),
            "security": [{"bearer": []}, {"x-api-key": []}]}},
        "/v1/messages/count_tokens": {"post": {
            "summary": "Count a Messages request's input tokens (Anthropic's count_tokens: the "
                       "body without max_tokens), with the model's own tokenizer and template",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"type": "object", "required": ["model", "messages"]}}}},
            "responses": {"200": {"description": "{input_tokens}", "content": {
                "application/json": {"schema": {"type": "object",
                                                "required": ["input_tokens"]}}}},
                          **{code: _ERR for code in ("400", "401", "404", "413", "415")}},
            "security": [{"bearer": []}, {"x-api-key": []}]}},
        "/v1/responses": {"post": {
            **_generate("Create a response (OpenAI Responses API, with previous_response_id; "
                        "docs/api.md)", "#/components/schemas/ResponsesRequest"),
            "security": [{"bearer": []}]}},
        "/v1/responses/{id}": {
            "get": {**_get("A stored response (the tenant's own; 404 when not stored, expired "
                           "or another tenant's)", "application/json", {"type": "object"}),
                    "parameters": [_ID], "security": [{"bearer": []}]},
            "delete": {**_get("Forget a stored response", "application/json",
                              {"type": "object", "required": ["id", "deleted"]}),
                       "parameters": [_ID], "security": [{"bearer": []}]}},
        "/v1/responses/{id}/input_items": {"get": {
            **_get("A stored response's input items, a page at a time (limit 1-100, default "
                   "20; order desc (default) or asc; after an item id)", "application/json",
                   {"type": "object", "required": ["object", "data", "has_more"]}),
            "parameters": [_ID, *({"name": n, "in": "query", "required": False,
                                   "schema": {"type": t}}
                                  for n, t in (("limit", "integer"), ("order", "string"),
                                               ("after", "string")))],
            "security": [{"bearer": []}]}},
        "/v1/models": {"get": {
            **_get("List models", "application/json", {"type": "object"}),
            "security": [{"bearer": []}]}},
        "/health": {"get": _get("Liveness; 503 while draining", "application/json",
                                {"type": "object"})},
        "/metrics": {"get": _get("Prometheus metrics", "text/plain", {"type": "string"})},
        "/openapi.json": {"get": _get("This document", "application/json",
                                      {"type": "object"})},
        "/debug/cache-health": {"get": _get(
            "Cache-routing health per worker (404 where the replica has no monitor)",
            "application/json", {"type": "object", "required": ["ok", "workers"]})},
        "/debug/workers": {"get": _get(
            "The replica's routing set: per worker its model, role, health, protocol (does it "
            "return token ids), queued prefill tokens (404 where the replica has no pool)",
            "application/json", {"type": "object", "required": ["workers"]})},
        "/debug/governance": {"get": _get(
            "This replica's admission state: outcomes per tenant, reservations outstanding, "
            "the fair-share queue, the ledger link (404 where the replica has no governor)",
            "application/json", {"type": "object", "required": ["tenants", "ledger"]})},
        "/v1/meshd/usage": {"get": _get(
            "Spend and tokens per tenant, model and UTC day, fleet-wide from the usage ledger, "
            "with the current windows of each budget and rate limit. An admin tenant sees "
            "every tenant (query `tenant` to pick one), any other tenant its own; query "
            "`since` / `until` (YYYY-MM-DD, inclusive; default this month)",
            "application/json", {"type": "object", "required": ["data", "totals", "limits"]})},
        "/debug/requests": {"get": _get(
            "This replica's request records (newest first; query request_id, tenant, model, "
            "outcome, limit) or, with rollups=1, its hourly rollups between since and until "
            "(unix seconds; default the last 24 h); 404 where the replica keeps none",
            "application/json", {"type": "object", "required": ["object", "stats"]})},
        "/v1/meshd/keys": {"get": {
            **_get("The keys receipts are checked against: the gateway's receipt key and the "
                   "trust store's node keys, each revoked one with its revocation time "
                   "(`meshd receipt verify`)", "application/json",
                   {"type": "object", "required": ["gateways", "nodes"]}),
            "security": [{"bearer": []}]}},
    },
}

SPEC_BYTES: bytes = orjson.dumps(SPEC)
