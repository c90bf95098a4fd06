"""Prompts at the edge: chat template, tokenization and block hashes, once per request.

The gateway tokenizes exactly as the workers do (the same tokenizer files, the same chat
template) and sends token ids, so every worker — prefill, decode, or a continuation after a
failure — sees the identical prompt, and the block hashes computed here are the ones the
workers publish in their KV events (vLLM `sha256_cbor` with the mesh's shared seed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshd.coordinator.gateway.http.api_request import ApiRequest
from meshd.coordinator.gateway.http.errors import ApiError
from meshd.coordinator.gateway.http.openai_api import ChatRequest
from meshd.node_agent.engine.tokenizer import Tokenizer, load_tokenizer
from meshd.scheduler.block_hash import BlockHasher, to_int64


@dataclass(frozen=True, slots=True)
class Prompt:
    token_ids: tuple[int, ...]
    block_hashes: tuple[int, ...]  # low 64 bits, as published in KV events
    # the client's cache hint (Anthropic `cache_control`): the prompt's tokens up to the end of
    # the last marked block, the prefix it will send again (0: no hint); a routing hint
    cache_hint_tokens: int = 0


class PromptBuilder:
    """Per-model tokenizers (`tokenizer_paths[model]`, default: meshd's byte tokenizer)."""

    def __init__(self, tokenizer_paths: Mapping[str, str] | None = None,
                 hash_seed: str | None = "0") -> None:
        self.paths = dict(tokenizer_paths or {})
        self.hash_seed = hash_seed
        self._tokenizers: dict[str, Tokenizer] = {}
        self._hashers: dict[int, BlockHasher] = {}

    def tokenizer(self, model: str) -> Tokenizer:
        tok = self._tokenizers.get(model)
        if tok is None:
            tok = self._tokenizers[model] = load_tokenizer(self.paths.get(model) or None)
        return tok

    def build(self, req: ApiRequest, block_size: int) -> Prompt:
        """Token ids and block hashes of the request's prompt; ApiError(400) if it has none."""
        body = req.body
        tok = self.tokenizer(body.model)
        hint = 0
        if isinstance(body, ChatRequest) and body.conversation is not None:
            ids = self._render(tok, body.conversation, body.prefill)
            hint = self._hint_tokens(tok, body.conversation, ids)
        elif isinstance(body, ChatRequest):
            messages = [{"role": m.role, "content": m.content or ""} for m in body.messages]
            try:
                ids = tok.apply_chat_template(messages)
            except ValueError as e:
                raise ApiError(400, str(e), param="messages") from None
        elif isinstance(body.prompt, str):
            ids = tok.encode(body.prompt)
        else:
            ids = list(body.prompt)
        if not ids:
            raise ApiError(400, "The prompt is empty.", param="prompt")
        return Prompt(tuple(ids), self.hashes(ids, block_size), hint)

    @staticmethod
    def _hint_tokens(tok: Tokenizer, conv: Any, ids: list[int]) -> int:
        """How much of `ids` the cache-hinted prefix is: the conversation cut after its last
        hinted unit, rendered without a generation prompt, as far as it agrees with `ids`
        (exact whatever the template does after the cut)."""
        from meshd.coordinator.gateway.dialects.model import cache_hint_prefix, truncated
        from meshd.coordinator.gateway.dialects.template import to_template_messages

        units = cache_hint_prefix(conv)
        if not units:
            return 0
        messages, tools = to_template_messages(truncated(conv, units))
        try:
            head = tok.apply_chat_template(messages, add_generation_prompt=False, tools=tools)
        except ValueError:
            return 0
        n = 0
        for a, b in zip(head, ids, strict=False):
            if a != b:
                break
            n += 1
        return n

    @staticmethod
    def _render(tok: Tokenizer, conv: Any, prefill: str) -> list[int]:
        """A structured conversation through the model's template, tools included (none when
        the tool choice is "none", as vLLM does); an Anthropic prefill continues the
        assistant turn the template opens."""
        from meshd.coordinator.gateway.dialects.template import to_template_messages

        messages, tools = to_template_messages(conv)
        if conv.tool_choice is not None and conv.tool_choice.mode == "none":
            tools = None
        try:
            ids = tok.apply_chat_template(messages, tools=tools)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        if prefill:
            ids.extend(tok.encode(prefill, add_bos=False))
        return ids

    def hashes(self, token_ids: Sequence[int], block_size: int) -> tuple[int, ...]:
        hasher = self._hashers.get(block_size)
        if hasher is None:
            hasher = self._hashers[block_size] = BlockHasher(block_size, self.hash_seed)
        digests: list[bytes] = []
        hasher.extend(digests, token_ids)
        return tuple(to_int64(h) for h in digests)
