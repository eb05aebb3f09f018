"""Tests for pipeline/rollout/backends/sampling.py: greedy picks, the top-p nucleus, and the logprobs
recorded for training."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.rollout.backends.sampling import sample

# One row's next-token distribution: probabilities 0.5, 0.3, 0.15, 0.05 (logits are their logs).
PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def rows(n: int) -> torch.Tensor:
    return PROBS.log().expand(n, -1).clone()


def test_greedy_takes_the_argmax_with_its_untempered_logprob():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, -1.0, 0.5]])
    tokens, logprobs = sample(logits, temperature=0.0, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert tokens.tolist() == [1, 0]
    expected = torch.log_softmax(logits, dim=-1)[[0, 1], [1, 0]]
    assert logprobs.tolist() == pytest.approx(expected.tolist())


def test_top_p_samples_only_from_the_nucleus():
    """With top_p=0.7 the nucleus is the two most likely tokens (0.5 + 0.3 reaches 0.7); both are drawn,
    nothing else is, and each token's logprob is the tempered distribution's, before the cut."""
    tokens, logprobs = sample(rows(400), temperature=1.0, top_p=0.7, generator=torch.Generator().manual_seed(1))
    assert set(tokens.tolist()) == {0, 1}
    assert logprobs.tolist() == pytest.approx([math.log(PROBS[t]) for t in tokens.tolist()], abs=1e-6)


def test_temperature_scales_the_recorded_logprobs():
    tokens, logprobs = sample(rows(50), temperature=0.5, top_p=1.0, generator=torch.Generator().manual_seed(2))
    tempered = torch.log_softmax(PROBS.log() / 0.5, dim=-1)
    assert len(set(tokens.tolist())) > 1
    assert logprobs.tolist() == pytest.approx(tempered[tokens].tolist(), abs=1e-6)


def test_the_same_seed_draws_the_same_tokens():
    draw = lambda seed: sample(rows(64), 1.0, 1.0, torch.Generator().manual_seed(seed))[0].tolist()  # noqa: E731
    assert draw(3) == draw(3)
    assert draw(3) != draw(4)
