"""Tests for pipeline/training/value_head.py: the gae critic's head and the hidden states it reads."""

from __future__ import annotations

import torch

from pipeline.training.advantages import gae_over_turns
from pipeline.training.value_head import ValueHead, boundary_hidden_states


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
    head = ValueHead(hidden.shape[-1])
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    boundaries = ValueHead.boundaries(spans)
    assert boundaries == [[4, 13], [2, 11]]
    losses = []
    for _ in range(60):
        values = head(hidden, boundaries)
        _, targets = gae_over_turns(rewards, [v.tolist() for v in values], gamma=1.0, lam=1.0)
        loss = ValueHead.loss(values, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    assert all(p.grad is None for p in model.parameters())  # the policy is untouched


def test_boundary_hidden_states_are_the_decoders_state_before_each_turn(tiny_model_dir):
    """Row i, turn t holds the decoder's last hidden state at the token before turn t (the end of the
    generation prompt), from one pass that sees no later token; the model's train mode is restored."""
    from types import SimpleNamespace

    from pipeline.models import load_model

    model, _ = load_model(str(tiny_model_dir))
    model.train()
    torch.manual_seed(0)
    episodes = [torch.randint(0, 200, (20,)).tolist(), torch.randint(0, 200, (12,)).tolist()]
    spans = [[(4, 7), (10, 15)], [(6, 9)]]
    trajectories = [SimpleNamespace(tokens=SimpleNamespace(input_ids=ids, turn_spans=s))
                    for ids, s in zip(episodes, spans)]
    hidden, indices = boundary_hidden_states(model, trajectories, pad_id=0)
    assert hidden.shape == (2, 2, 16) and indices == [[0, 1], [0]]
    assert model.training
    model.eval()
    with torch.no_grad():
        for i, (ids, s) in enumerate(zip(episodes, spans)):
            full = model.model(torch.tensor([ids])).last_hidden_state[0]
            for t, (start, _) in enumerate(s):
                torch.testing.assert_close(hidden[i, t], full[start - 1], rtol=1e-5, atol=1e-6)
    assert torch.equal(hidden[1, 1], torch.zeros(16))  # episode 1 has one turn: the second slot stays empty
