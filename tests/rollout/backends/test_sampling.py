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


def test_with_a_generator_per_row_each_row_draws_from_its_own_stream_only():
    """Row b's token comes from generator b alone: the same rows drawn in another batch, in another order,
    next to other rows, or one by one give the same tokens."""
    logits = torch.randn(6, 30)

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    batch = sample(logits, 1.0, 0.9, gens(range(6)))[0].tolist()
    alone = [sample(logits[b: b + 1], 1.0, 0.9, gens([b]))[0].item() for b in range(6)]
    order = [4, 0, 5, 2]
    reordered = sample(logits[order], 1.0, 0.9, gens(order))[0].tolist()
    assert batch == alone and reordered == [batch[b] for b in order]
    assert len(set(sample(logits[:1].expand(40, -1), 1.0, 1.0, gens(range(40)))[0].tolist())) > 1
    with pytest.raises(ValueError, match="got 2 generators for 6 rows"):
        sample(logits, 1.0, 1.0, gens(range(2)))


def test_doctests():
    import doctest

    import pipeline.rollout.backends.sampling as module

    assert doctest.testmod(module).failed == 0
