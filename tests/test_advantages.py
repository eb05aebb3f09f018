"""Tests for pipeline/advantages.py on hand-computed values."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

from pipeline import advantages as adv


def test_doctests():
    assert doctest.testmod(adv).failed == 0


def test_group_based_normalises_within_each_group():
    # group a: rewards 1, 0, 0, 1 -> mean 0.5, population std 0.5 -> +-1 (up to eps)
    # group b: 0.2, 0.8 -> mean 0.5, std 0.3 -> -+1
    out = adv.group_based(torch.tensor([1.0, 0.0, 0.2, 0.0, 1.0, 0.8]), ["a", "a", "b", "a", "a", "b"])
    expected = [0.5 / (0.5 + adv.EPS), -0.5 / (0.5 + adv.EPS), -0.3 / (0.3 + adv.EPS),
                -0.5 / (0.5 + adv.EPS), 0.5 / (0.5 + adv.EPS), 0.3 / (0.3 + adv.EPS)]
    assert out.tolist() == pytest.approx(expected, abs=1e-6)
    # A group with identical rewards has zero advantage (no learning signal).
    assert adv.group_based(torch.tensor([0.3, 0.3]), [0, 0]).tolist() == [0.0, 0.0]
    # Dr. GRPO: no std scaling.
    assert adv.group_based(torch.tensor([1.0, 0.0, 0.0, 0.0]), [0] * 4, scale=False).tolist() == [0.75, -0.25, -0.25, -0.25]


def test_rloo_subtracts_the_leave_one_out_mean():
    # rewards 3, 1, 2: baselines (1+2)/2=1.5, (3+2)/2=2.5, (3+1)/2=2
    assert adv.rloo(torch.tensor([3.0, 1.0, 2.0]), [0, 0, 0]).tolist() == [1.5, -1.5, 0.0]
    assert adv.rloo(torch.tensor([5.0]), [0]).tolist() == [0.0]


@pytest.mark.parametrize("successes, k, expected", [
    # N=4, one success, k=2: rho = 1 - C(3,2)/C(4,2) = 0.5, sigma = 0.5
    # A_pos = 0.5/0.5 = 1; A_neg = (0.5 - C(2,1)/C(3,1)) / 0.5 = -1/3
    ([1, 0, 0, 0], 2, [1.0, -1 / 3, -1 / 3, -1 / 3]),
    # N=4, two successes, k=2: rho = 1 - C(2,2)/C(4,2) = 5/6, sigma = sqrt(5/36)
    # A_pos = (1/6)/sigma; A_neg = (1/6 - C(1,1)/C(3,1)) / sigma = (-1/6)/sigma
    ([1, 1, 0, 0], 2, [(1 / 6) / math.sqrt(5 / 36)] * 2 + [(-1 / 6) / math.sqrt(5 / 36)] * 2),
    # k=1 reduces to GRPO with binary rewards: rho = 1/4, sigma = sqrt(3/16)
    ([1, 0, 0, 0], 1, [0.75 / math.sqrt(3 / 16)] + [-0.25 / math.sqrt(3 / 16)] * 3),
    ([0, 0, 0, 0], 2, [0.0] * 4),  # no success: no signal
    ([1, 1, 1, 1], 2, [0.0] * 4),
])
def test_grpo_passk(successes, k, expected):
    out = adv.grpo_passk(torch.tensor(successes), [0] * 4, k=k)
    assert out.tolist() == pytest.approx(expected, abs=1e-6)


def test_grpo_passk_needs_k_samples_per_group():
    with pytest.raises(ValueError, match="at least k=3"):
        adv.grpo_passk(torch.tensor([1, 0]), [0, 0], k=3)


def test_returns_to_go_and_group_based_per_turn():
    # episode 0: turn rewards 0, 1 -> G = [1, 1]; episode 1: 1, 0, 0 -> G = [1, 0, 0]; episode 2: 0 -> G = [0]
    rewards = [[0.0, 1.0], [1.0, 0.0, 0.0], [0.0]]
    assert adv.returns_to_go(rewards) == [[1.0, 1.0], [1.0, 0.0, 0.0], [0.0]]
    assert adv.returns_to_go([[1.0, 1.0]], gamma=0.5) == [[1.5, 1.0]]
    out = adv.group_based_per_turn(rewards, [0, 0, 0], scale=False)
    # turn 0: G = 1, 1, 0 -> mean 2/3; turn 1: G = 1, 0 (episodes 0, 1) -> mean 1/2; turn 2: only episode 1 -> 0
    assert out[0] == pytest.approx([1 / 3, 0.5])
    assert out[1] == pytest.approx([1 / 3, -0.5, 0.0])
    assert out[2] == pytest.approx([-2 / 3])
    scaled = adv.group_based_per_turn(rewards, [0, 0, 0])
    std0 = math.sqrt(((1 / 3) ** 2 * 2 + (2 / 3) ** 2) / 3)
    assert scaled[2][0] == pytest.approx((-2 / 3) / (std0 + adv.EPS))
    assert scaled[0][1] == pytest.approx(0.5 / (0.5 + adv.EPS))


def test_group_based_per_turn_credits_the_turn_that_earned_the_reward():
    """Two episodes that differ only in turn 0's reward: only turn 0 gets a non-zero advantage. Episode
    GRPO would give every turn of the episode the same +-0.5."""
    out = adv.group_based_per_turn([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [0, 0], scale=False)
    assert out == [[0.5, 0.0, 0.0], [-0.5, 0.0, 0.0]]
    episode = adv.group_based(torch.tensor([1.0, 0.0]), [0, 0], scale=False)
    assert episode.tolist() == [0.5, -0.5]


def test_monte_carlo():
    rewards = [[0.0, 1.0], [1.0]]
    assert adv.monte_carlo(rewards, baseline="none") == [[1.0, 1.0], [1.0]]
    # batch-mean baseline: turn 0 mean of (1, 1) = 1; turn 1 only episode 0 -> 1
    assert adv.monte_carlo(rewards) == [[0.0, 0.0], [0.0]]
    assert adv.monte_carlo([[0.0, 1.0], [0.0]], gamma=0.5) == [[0.25, 0.0], [-0.25]]
    with pytest.raises(ValueError, match="baseline"):
        adv.monte_carlo(rewards, baseline="median")


def test_gae_over_turns_by_hand():
    # r = [0, 0.5, 1], V = [0.2, 0.4, 0.6], gamma = 0.9, lambda = 0.8
    # delta_2 = 1 + 0 - 0.6 = 0.4
    # delta_1 = 0.5 + 0.9*0.6 - 0.4 = 0.64
    # delta_0 = 0 + 0.9*0.4 - 0.2 = 0.16
    # A_2 = 0.4; A_1 = 0.64 + 0.72*0.4 = 0.928; A_0 = 0.16 + 0.72*0.928 = 0.82816
    advantages, targets = adv.gae([[0.0, 0.5, 1.0]], [[0.2, 0.4, 0.6]], gamma=0.9, lam=0.8)
    assert advantages[0] == pytest.approx([0.82816, 0.928, 0.4])
    assert targets[0] == pytest.approx([1.02816, 1.328, 1.0])
    # lambda = 1, gamma = 1: A_t = G_t - V_t (Monte-Carlo minus baseline)
    advantages, _ = adv.gae([[0.0, 0.5, 1.0]], [[0.2, 0.4, 0.6]], gamma=1.0, lam=1.0)
    assert advantages[0] == pytest.approx([1.3, 1.1, 0.4])
    # lambda = 0: one-step TD errors
    advantages, _ = adv.gae([[0.0, 0.5, 1.0]], [[0.2, 0.4, 0.6]], gamma=0.9, lam=0.0)
    assert advantages[0] == pytest.approx([0.16, 0.64, 0.4])
    with pytest.raises(ValueError, match="one value per turn"):
        adv.gae([[0.0, 1.0]], [[0.0]])


def test_broadcast_turns_writes_shape_b_by_t():
    out = adv.broadcast_turns([[0.5, -1.0], [2.0]], [[(2, 4), (6, 7)], [(1, 2)]], length=8)
    assert out.shape == (2, 8)
    assert out.tolist() == [[0, 0, 0.5, 0.5, 0, 0, -1.0, 0], [0, 2.0, 0, 0, 0, 0, 0, 0]]
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])
    assert adv.broadcast_episodes(torch.tensor([2.0, -1.0]), mask).tolist() == [[0, 2, 2, 0], [-1, -1, 0, 0]]


def test_value_loss_falls_on_a_fixed_batch(tiny_model_dir):
    """The value head, trained alone on the policy's hidden states at turn boundaries, fits its GAE targets."""
    from pipeline.models import load_model

    model, _ = load_model(str(tiny_model_dir))
    torch.manual_seed(0)
    ids = torch.randint(0, 200, (2, 24))
    spans = [[(5, 9), (14, 18)], [(3, 8), (12, 20)]]
    rewards = [[0.0, 1.0], [0.5, -0.5]]
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[-1]
    head = adv.ValueHead(hidden.shape[-1])
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    boundaries = adv.ValueHead.boundaries(spans)
    assert boundaries == [[4, 13], [2, 11]]
    losses = []
    for _ in range(60):
        values = head(hidden, boundaries)
        _, targets = adv.gae(rewards, [v.tolist() for v in values], gamma=1.0, lam=1.0)
        loss = adv.ValueHead.loss(values, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    assert all(p.grad is None for p in model.parameters())  # the policy is untouched
