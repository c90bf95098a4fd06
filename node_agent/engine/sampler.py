"""Token sampling and logprobs for one logits row at a time.

Greedy is argmax (ties: lowest id). Otherwise: temperature, then top-k, then top-p over the
sorted distribution (the most likely token always survives), then a multinomial draw from the
request's own generator (seeded requests) or the engine's.
"""

from __future__ import annotations

import torch

from meshd.node_agent.engine.api import SamplingParams, TokenLogprob


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """One token id from a 1-D fp32 logits row."""
    if params.greedy:
        return int(torch.argmax(logits).item())
    x = logits / params.temperature
    if params.top_k > 0 and params.top_k < x.shape[0]:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        cum = torch.softmax(sorted_x, dim=-1).cumsum(dim=-1)
        drop = (cum - torch.softmax(sorted_x, dim=-1)) >= params.top_p  # keeps the first
        x = x.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(x, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen).item())


def confidence_of(logits: torch.Tensor) -> float:
    """exp(-entropy) of the raw distribution over the whole vocabulary: 1 for a certain token,
    1/k for a k-way tie (what the gateway estimates from top-k logprobs when a worker cannot
    score its own tokens; exact here, where the logits are)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    h = -(lp.exp() * lp).sum()
    return float(torch.exp(-h).item())


def logprobs_of(logits: torch.Tensor, token_id: int, n: int) -> TokenLogprob:
    """The sampled token's logprob and the top `n` under the raw distribution."""
    lp = torch.log_softmax(logits, dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if n > 0:
        vals, ids = torch.topk(lp, min(n, lp.shape[0]))
        top = tuple(zip(ids.tolist(), vals.tolist(), strict=True))
    return TokenLogprob(token_id, float(lp[token_id].item()), top)
