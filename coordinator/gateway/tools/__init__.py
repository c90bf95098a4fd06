"""Tool calls and reasoning out of a model's generated text (the gateway's vLLM-style parsers).

`make_tool_parser("hermes" | "qwen" | "llama3_json" | "none")`, `make_reasoning_parser("qwen3" |
"deepseek_r1" | "none")`, or both at once with `make_output_parser(tools, reasoning)`. A parser
has `parse(text) -> ParsedOutput` and `stream()`, whose `feed(delta)` / `finish()` return
`StreamEvent`s; the two always agree (events.py). Calls are streamed coarsely: a call's name and
its whole arguments come together once its text is complete, because until then it may still
turn out to be plain text; content and reasoning stream as they arrive, less a held-back
suffix that could be the start of a marker.

Modules: `events.py` results, events, protocols, shared helpers; `json_scan.py` finds where
a JSON object ends; `hermes.py` `<tool_call>` blocks; `llama.py` Llama 3.x JSON calls;
`reasoning.py` `<think>` blocks; `plain.py` the "none" parsers and reasoning-then-tools
chaining; `registry.py` the names.
"""

from meshd.coordinator.gateway.tools.events import (
    ArgsDelta,
    CallEnd,
    CallStart,
    ContentDelta,
    OutputStream,
    ParsedCall,
    ParsedOutput,
    ReasoningDelta,
    ReasoningParser,
    StreamEvent,
    ToolParser,
    collect,
)
from meshd.coordinator.gateway.tools.registry import (
    make_output_parser,
    make_reasoning_parser,
    make_tool_parser,
)

__all__ = [
    "ArgsDelta",
    "CallEnd",
    "CallStart",
    "ContentDelta",
    "OutputStream",
    "ParsedCall",
    "ParsedOutput",
    "ReasoningDelta",
    "ReasoningParser",
    "StreamEvent",
    "ToolParser",
    "collect",
    "make_output_parser",
    "make_reasoning_parser",
    "make_tool_parser",
]
