"""The engine's own token confidence: exp(-entropy) over the whole vocabulary."""

from __future__ import annotations

import math

import pytest
import torch

from meshd.node_agent.engine.sampler import confidence_of


@pytest.mark.parametrize(("logits", "want"), [
    (torch.tensor([0.0, -1e9, -1e9, -1e9]), 1.0),       # certain
    (torch.zeros(4), 0.25),                              # a 4-way tie
    (torch.log(torch.tensor([0.5, 0.5, 1e-30])), 0.5),   # two ways
    (torch.log(torch.tensor([0.9, 0.1])), math.exp(0.9 * math.log(0.9) + 0.1 * math.log(0.1))),
])
def test_confidence_of(logits: torch.Tensor, want: float) -> None:
    assert confidence_of(logits) == pytest.approx(want, rel=1e-5)
