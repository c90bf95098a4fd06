"""Stop conditions and incremental output text for one sequence (vLLM v1 semantics).

Order after each new token: EOS (unless `ignore_eos`), a stop token id, a stop string in the
decoded text (text cut before it unless `include_stop_str_in_output`), then the length caps
(`max_tokens`, `max_model_len`). While unfinished, the streamed text holds back a possible
partial stop string and trailing U+FFFD (an incomplete UTF-8 sequence).
"""

from __future__ import annotations

from meshd.node_agent.engine.sequence import Sequence
from meshd.node_agent.engine.tokenizer import Tokenizer


def check_stop(seq: Sequence, token: int, eos_id: int | None, tok: Tokenizer,
               max_model_len: int) -> None:
    """Update `seq.text` and set `seq.finish_reason` / `seq.stop_reason` if it must stop."""
    p = seq.request.sampling
    seq.text = decode_incremental(seq, tok)
    if token == eos_id and not p.ignore_eos:
        seq.finish_reason = "stop"
        return
    if token in p.stop_token_ids:
        seq.finish_reason, seq.stop_reason = "stop", token
        return
    if p.stop:
        hit = _find_stop(seq.text, p.stop, max(0, seq.sent_text_len - _longest(p.stop)))
        if hit is not None:
            idx, s = hit
            seq.text = seq.text[:idx + (len(s) if p.include_stop_str_in_output else 0)]
            seq.finish_reason, seq.stop_reason = "stop", s
            return
    if seq.num_output >= p.max_tokens or seq.num_tokens >= max_model_len:
        seq.finish_reason = "length"


def decode_incremental(seq: Sequence, tok: Tokenizer) -> str:
    """The output text so far, decoding only a small window of recent tokens per call.

    Text is committed once the window decodes cleanly (no trailing U+FFFD); the window starts
    one commit back, so tokenizers whose decode depends on the previous token (leading
    spaces, byte fallback) see the same context as a full decode. Until then the pending
    part, possibly ending in U+FFFD, is returned after the committed text.
    """
    start = seq.num_prompt
    window = tok.decode(seq.token_ids[start + seq.prefix_offset:])
    pending = window[len(seq.prefix_text):]
    if not pending or window.endswith("\ufffd"):
        return seq.stable_text + pending
    seq.stable_text += pending
    seq.prefix_offset, seq.read_offset = seq.read_offset, len(seq.token_ids) - start
    seq.prefix_text = tok.decode(seq.token_ids[start + seq.prefix_offset:start + seq.read_offset])
    return seq.stable_text


def _longest(stops: tuple[str, ...]) -> int:
    return max(len(s) for s in stops)


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s, start)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def take_text_delta(seq: Sequence) -> str:
    """Text not yet returned for `seq`; advances `seq.sent_text_len`."""
    text = seq.text
    end = len(text)
    if seq.finish_reason is None:
        p = seq.request.sampling
        if p.stop and not p.include_stop_str_in_output:
            end -= _longest(p.stop) - 1
        while end > seq.sent_text_len and text[end - 1] == "\ufffd":
            end -= 1
    if end <= seq.sent_text_len:
        return ""
    delta = text[seq.sent_text_len:end]
    seq.sent_text_len = end
    return delta
