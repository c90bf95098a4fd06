"""Readers for one field of a decoded dialect body: type and range checks, nothing else.

Each raises `ApiError(400)` whose `param` is the JSON path of the field (`messages[2].content`)
and whose message says what is accepted. Booleans are never numbers here (`true` is not `1`)
and floats are never integers (`5.0` is not `5`), as in `gateway/http/fields.py`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from meshd.api_errors import ApiError, invalid
from meshd.coordinator.gateway.dialects.model import Text, ToolChoice, ToolSpec

TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
INT_MAX = 2**31 - 1


def path(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def obj_at(v: object, param: str, what: str = "an object") -> dict[str, Any]:
    if type(v) is not dict:
        raise invalid(f"'{param}' must be {what}.", param)
    return v


def str_at(v: object, param: str, *, non_empty: bool = False) -> str:
    if type(v) is not str or (non_empty and not v):
        raise invalid(f"'{param}' must be a {'non-empty ' if non_empty else ''}string.", param)
    return v


def opt_str(obj: dict[str, Any], key: str, prefix: str = "") -> str | None:
    v = obj.get(key)
    return None if v is None else str_at(v, path(prefix, key))


def opt_bool(obj: dict[str, Any], key: str, default: bool, prefix: str = "") -> bool:
    v = obj.get(key)
    if v is None:
        return default
    if type(v) is not bool:
        raise invalid(f"'{path(prefix, key)}' must be a boolean.", path(prefix, key))
    return v


def opt_int(obj: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    v = obj.get(key)
    if v is None:
        return None
    if type(v) is not int or not lo <= v <= hi:
        raise invalid(f"'{key}' must be an integer between {lo} and {hi}, got {v!r}.", key)
    return v


def opt_float(obj: dict[str, Any], key: str, lo: float, hi: float,
              lo_open: bool = False) -> float | None:
    v = obj.get(key)
    if v is None:
        return None
    if type(v) is not float and type(v) is not int:
        raise invalid(f"'{key}' must be a number, got {type(v).__name__}.", key)
    if v > hi or v < lo or (lo_open and v == lo):
        raise invalid(f"'{key}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}.", key)
    return float(v)


def refuse_unknown(obj: dict[str, Any], known: frozenset[str], prefix: str = "") -> None:
    """400 naming every key of `obj` outside `known` (sorted); `param` is the first."""
    unknown = sorted(k for k in obj if k not in known)
    if unknown:
        where = f" in '{prefix}'" if prefix else ""
        raise invalid(f"Unknown or unsupported fields{where}: {', '.join(unknown)} "
                      f"(supported: {', '.join(sorted(known))}).", path(prefix, unknown[0]))


def unsupported(what: str, param: str) -> ApiError:
    return invalid(f"'{param}': {what} is not supported; meshd serves text-only models.", param)


def json_object_text(v: object, param: str) -> str:
    """`v` as given, once it is checked to be a string holding a JSON object."""
    if type(v) is not str:
        raise invalid(f"'{param}' must be a string holding a JSON object.", param)
    try:
        obj = json.loads(v)
    except ValueError as e:
        raise invalid(f"'{param}' is not valid JSON: {e}.", param) from None
    if type(obj) is not dict:
        raise invalid(f"'{param}' must hold a JSON object, got {type(obj).__name__}.", param)
    return v


def dump_json(obj: object) -> str:
    """The JSON text the dialects write for an object that arrived parsed (Anthropic `input`,
    tool schemas): key order kept, non-ASCII kept, default separators."""
    return json.dumps(obj, ensure_ascii=False)


def schema_text(v: object, param: str, *, required: bool) -> str | None:
    if v is None and not required:
        return None
    return dump_json(obj_at(v, param, "a JSON-schema object"))


def tool_name(v: object, param: str) -> str:
    if type(v) is not str or not TOOL_NAME.fullmatch(v):
        raise invalid(f"'{param}' must match ^[a-zA-Z0-9_-]{{1,64}}$, got {v!r}.", param)
    return v


def cache_hint(obj: dict[str, Any], prefix: str) -> bool:
    """`cache_control` of a block: absent/null -> False; `{"type": "ephemeral", "ttl"?:
    "5m"|"1h"}` -> True; anything else 400."""
    cc = obj.get("cache_control")
    if cc is None:
        return False
    param = path(prefix, "cache_control")
    if type(cc) is not dict or cc.get("type") != "ephemeral" or not set(cc) <= {"type", "ttl"}:
        raise invalid(f"'{param}' must be {{\"type\": \"ephemeral\"}} (optionally with "
                      "\"ttl\": \"5m\" or \"1h\").", param)
    if cc.get("ttl", "5m") not in ("5m", "1h"):
        raise invalid(f"'{param}.ttl' must be \"5m\" or \"1h\".", f"{param}.ttl")
    return True


def text_parts(v: object, param: str, kinds: frozenset[str], media: frozenset[str],
               wrong: str) -> tuple[Text, ...]:
    """A content field: a string, or a non-empty list of text parts whose `type` is one of
    `kinds` (media parts are unsupported; any other type is refused with `wrong`, formatted
    with `p`, the part's path, and `kind`)."""
    if type(v) is str:
        return (Text(v),)
    if type(v) is not list or not v:
        raise invalid(f"'{param}' must be a string or a non-empty list of text parts.", param)
    out = []
    for j, part in enumerate(v):
        p = f"{param}[{j}]"
        kind = obj_at(part, p).get("type")
        if kind in media:
            raise unsupported(f"content part type {kind!r}", f"{p}.type")
        if kind not in kinds:
            raise invalid(wrong.format(p=p, kind=kind), f"{p}.type")
        out.append(Text(str_at(part.get("text"), f"{p}.text"), cache_hint(part, p)))
    return tuple(out)


def list_at(v: object, param: str, *, non_empty: bool = False) -> list[Any]:
    if type(v) is not list or (non_empty and not v):
        raise invalid(f"'{param}' must be a {'non-empty ' if non_empty else ''}list.", param)
    return v


def unique_tools(specs: list[ToolSpec], param: str) -> tuple[ToolSpec, ...]:
    """`specs` as a tuple; 400 at `param.format(j=index)` for a name defined twice."""
    seen: set[str] = set()
    for j, s in enumerate(specs):
        if s.name in seen:
            raise invalid(f"The tool name {s.name!r} is defined twice.", param.format(j=j))
        seen.add(s.name)
    return tuple(specs)


def checked_choice(choice: ToolChoice, tools: tuple[ToolSpec, ...], param: str) -> ToolChoice:
    """`choice` once it is satisfiable with `tools` (a forced call needs a tool to call)."""
    if choice.mode in ("required", "tool") and not tools:
        raise invalid(f"'{param}': forcing a tool call ({choice.mode!r}) requires 'tools'.",
                      param)
    if choice.mode == "tool" and all(t.name != choice.name for t in tools):
        names = ", ".join(t.name for t in tools)
        raise invalid(f"'{param}': no tool named {choice.name!r} is defined (tools: {names}).",
                      param)
    return choice
