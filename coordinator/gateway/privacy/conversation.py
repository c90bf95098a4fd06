"""Masking a structured conversation (`dialects.model`): every text the model would read —
system, text blocks, reasoning, tool results, tool-call arguments — through the detector's
mask. A call's arguments are masked inside their JSON strings only, so they stay an object."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from meshd.coordinator.gateway.dialects.model import (
    Block,
    Conversation,
    Reasoning,
    Text,
    ToolCall,
    ToolResult,
)

Mask = Callable[[str], str]


def _json_strings(value: Any, mask: Mask) -> Any:
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, list):
        return [_json_strings(v, mask) for v in value]
    if isinstance(value, dict):
        return {k: _json_strings(v, mask) for k, v in value.items()}
    return value


def _block(b: Block, mask: Mask) -> Block:
    if isinstance(b, (Text, Reasoning)):
        return dataclasses.replace(b, text=mask(b.text))
    if isinstance(b, ToolResult):
        return dataclasses.replace(b, content=mask(b.content))
    if isinstance(b, ToolCall):
        try:
            args = json.dumps(_json_strings(json.loads(b.arguments), mask),
                              ensure_ascii=False, separators=(",", ":"))
        except ValueError:
            args = mask(b.arguments)
        return dataclasses.replace(b, arguments=args)
    return b


def mask_conversation(conv: Conversation, mask: Mask) -> Conversation:
    system = tuple(dataclasses.replace(t, text=mask(t.text)) for t in conv.system)
    turns = tuple(dataclasses.replace(t, blocks=tuple(_block(b, mask) for b in t.blocks))
                  for t in conv.turns)
    return dataclasses.replace(conv, system=system, turns=turns)
