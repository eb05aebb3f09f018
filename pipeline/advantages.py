"""Advantage estimators for multi-turn episodes.

Notation. A *group* is the set of episodes rolled out from the same task (GRPO's "G completions per
prompt"). Episode ``i`` has assistant turns ``t = 0..K_i-1`` with per-turn rewards ``r_{i,t}`` (the
terminal reward is added to the last turn) and an episode reward ``R_i = sum_t r_{i,t}``.

Episode-level estimators return one advantage per episode, shape ``(B,)``; the trainer spreads it over
the episode's assistant tokens. Turn-level estimators return one advantage per turn, and
:func:`broadcast_turns` writes them onto the tokens of each turn, giving the per-token tensor of shape
``(B, T)`` the loss consumes (zero outside assistant tokens).

Episode-level: ``group_based`` (GRPO), ``rloo``, ``grpo_passk``. Turn-level: ``group_based_per_turn``,
``monte_carlo``, ``gae`` (with a learned value function: PPO in multi-turn form).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

EPS = 1e-4


def _groups(group_ids: Sequence) -> dict:
    groups: dict = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    return groups


def group_based(rewards: torch.Tensor, group_ids: Sequence, scale: bool = True) -> torch.Tensor:
    """GRPO (Shao et al., 2024): ``A_i = (R_i - mean_g R) / (std_g R + eps)``; ``scale=False`` drops the
    division (Dr. GRPO). ``std`` is the population standard deviation of the group. Shape ``(B,)``.

    >>> group_based(torch.tensor([1.0, 0.0, 0.5, 0.5]), [0, 0, 1, 1]).tolist()
    [0.9998000264167786, -0.9998000264167786, 0.0, 0.0]
    """
    out = torch.zeros_like(rewards, dtype=torch.float32)
    for idx in _groups(group_ids).values():
        r = rewards[idx].float()
        centered = r - r.mean()
        out[idx] = centered / (r.std(unbiased=False) + EPS) if scale else centered
    return out


def rloo(rewards: torch.Tensor, group_ids: Sequence) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al., 2024): ``A_i = R_i - mean_{j in g, j != i} R_j``.

    Equal to ``n/(n-1) * (R_i - mean_g R)``; a group of one gets 0. Shape ``(B,)``.

    >>> rloo(torch.tensor([1.0, 0.0, 0.0]), [0, 0, 0]).tolist()
    [1.0, -0.5, -0.5]
    """
    out = torch.zeros_like(rewards, dtype=torch.float32)
    for idx in _groups(group_ids).values():
        n = len(idx)
        if n > 1:
            r = rewards[idx].float()
            out[idx] = r - (r.sum() - r) / (n - 1)
    return out


def grpo_passk(successes: torch.Tensor, group_ids: Sequence, k: int) -> torch.Tensor:
    """Pass@k advantages (Chen et al., 2025, "Pass@k Training"), analytic form for binary rewards.

    For a group of ``N`` episodes with ``N_neg`` failures, the group's pass@k is
    ``rho = 1 - C(N_neg, k) / C(N, k)`` and ``sigma = sqrt(rho (1 - rho))``. Then
    ``A_pos = (1 - rho) / sigma`` and ``A_neg = (1 - rho - C(N_neg - 1, k - 1) / C(N - 1, k - 1)) / sigma``.
    A failure is penalised only to the extent that it appears in k-subsets with no success, so the
    policy is pushed to explore rather than to collapse onto one answer. Groups with ``rho`` of 0 or 1
    get 0. Shape ``(B,)``.

    >>> grpo_passk(torch.tensor([1, 0, 0, 0]), [0, 0, 0, 0], k=2).tolist()
    [1.0, -0.3333333432674408, -0.3333333432674408, -0.3333333432674408]
    """
    out = torch.zeros(len(successes), dtype=torch.float32)
    for idx in _groups(group_ids).values():
        n = len(idx)
        if n < k:
            raise ValueError(f"grpo_passk needs at least k={k} episodes per group, got {n}")
        s = successes[idx].bool()
        n_neg = int((~s).sum())
        rho = 1.0 - math.comb(n_neg, k) / math.comb(n, k)
        if rho <= 0.0 or rho >= 1.0:
            continue
        sigma = math.sqrt(rho * (1.0 - rho))
        a_pos = (1.0 - rho) / sigma
        a_neg = (1.0 - rho - math.comb(n_neg - 1, k - 1) / math.comb(n - 1, k - 1)) / sigma
        out[idx] = torch.where(s, torch.tensor(a_pos), torch.tensor(a_neg))
    return out


def returns_to_go(turn_rewards: Sequence[Sequence[float]], gamma: float = 1.0) -> list[list[float]]:
    """``G_{i,t} = sum_{t' >= t} gamma^(t'-t) r_{i,t'}`` for every episode and turn.

    >>> returns_to_go([[0.0, 0.5, 1.0]], gamma=0.5)
    [[0.5, 1.0, 1.0]]
    """
    out = []
    for rewards in turn_rewards:
        g, rtg = 0.0, []
        for r in reversed(rewards):
            g = r + gamma * g
            rtg.append(g)
        out.append(rtg[::-1])
    return out


def group_based_per_turn(turn_rewards: Sequence[Sequence[float]], group_ids: Sequence, gamma: float = 1.0,
                         scale: bool = True) -> list[list[float]]:
    """Turn-level GRPO: returns-to-go normalised within the group at each turn index.

    ``A_{i,t} = (G_{i,t} - mean_{j in g: K_j > t} G_{j,t}) / (std_{j in g: K_j > t} G_{j,t} + eps)``.
    A turn index that only one episode of the group reached gets 0 (no comparison exists). Unlike
    episode-level GRPO, a turn that earns its reward (a correct tool call, a policy-compliant refusal)
    is credited at that turn, not smeared over the whole episode.

    >>> group_based_per_turn([[1.0, 1.0], [0.0, 1.0]], [0, 0], scale=False)
    [[0.5, 0.0], [-0.5, 0.0]]
    """
    rtg = returns_to_go(turn_rewards, gamma)
    out = [[0.0] * len(r) for r in rtg]
    for idx in _groups(group_ids).values():
        depth = max(len(rtg[i]) for i in idx)
        for t in range(depth):
            members = [i for i in idx if len(rtg[i]) > t]
            if len(members) < 2:
                continue
            values = torch.tensor([rtg[i][t] for i in members])
            centered = values - values.mean()
            if scale:
                centered = centered / (values.std(unbiased=False) + EPS)
            for i, a in zip(members, centered.tolist()):
                out[i][t] = a
    return out


def monte_carlo(turn_rewards: Sequence[Sequence[float]], gamma: float = 1.0,
                baseline: str = "batch_mean") -> list[list[float]]:
    """REINFORCE with Monte-Carlo returns: ``A_{i,t} = G_{i,t} - b_t``.

    ``baseline="batch_mean"`` uses the mean return-to-go of all episodes that reached turn ``t`` (a
    variance reducer that keeps the estimator unbiased); ``"none"`` uses ``b_t = 0``.

    >>> monte_carlo([[1.0], [0.0]], baseline="none")
    [[1.0], [0.0]]
    """
    rtg = returns_to_go(turn_rewards, gamma)
    if baseline == "none":
        return rtg
    if baseline != "batch_mean":
        raise ValueError(f"baseline must be 'batch_mean' or 'none', got {baseline!r}")
    depth = max((len(r) for r in rtg), default=0)
    means = []
    for t in range(depth):
        vals = [r[t] for r in rtg if len(r) > t]
        means.append(sum(vals) / len(vals))
    return [[g - means[t] for t, g in enumerate(r)] for r in rtg]


def gae(turn_rewards: Sequence[Sequence[float]], values: Sequence[Sequence[float]], gamma: float = 1.0,
        lam: float = 0.95) -> tuple[list[list[float]], list[list[float]]]:
    """Generalised advantage estimation over turns (Schulman et al., 2016).

    ``V_{i,t}`` is the value of the state before assistant turn ``t``; the state after the last turn is
    terminal (``V = 0``). ``delta_t = r_t + gamma V_{t+1} - V_t`` and ``A_t = sum_l (gamma lam)^l delta_{t+l}``.
    Returns ``(advantages, value_targets)`` with ``value_targets = A + V`` (the lambda-returns the value
    head regresses on).

    >>> gae([[0.0, 1.0]], [[0.5, 0.5]], gamma=1.0, lam=1.0)
    ([[0.5, 0.5]], [[1.0, 1.0]])
    """
    advantages, targets = [], []
    for rewards, vals in zip(turn_rewards, values):
        if len(rewards) != len(vals):
            raise ValueError(f"gae needs one value per turn: {len(rewards)} rewards, {len(vals)} values")
        adv, running = [0.0] * len(rewards), 0.0
        for t in reversed(range(len(rewards))):
            next_value = vals[t + 1] if t + 1 < len(vals) else 0.0
            delta = rewards[t] + gamma * next_value - vals[t]
            running = delta + gamma * lam * running
            adv[t] = running
        advantages.append(adv)
        targets.append([a + v for a, v in zip(adv, vals)])
    return advantages, targets


def broadcast_turns(turn_values: Sequence[Sequence[float]], turn_spans: Sequence[Sequence[tuple[int, int]]],
                    length: int) -> torch.Tensor:
    """Write each turn's value onto its tokens: ``out[i, start:end] = turn_values[i][t]``; 0 elsewhere.

    ``turn_spans[i][t]`` is the ``[start, end)`` token range of episode ``i``'s turn ``t`` in a
    sequence of ``length`` tokens. Returns shape ``(B, length)``.

    >>> broadcast_turns([[1.0, -1.0]], [[(1, 3), (4, 5)]], 6).tolist()
    [[0.0, 1.0, 1.0, 0.0, -1.0, 0.0]]
    """
    out = torch.zeros(len(turn_values), length)
    for i, (vals, spans) in enumerate(zip(turn_values, turn_spans)):
        if len(vals) != len(spans):
            raise ValueError(f"episode {i}: {len(vals)} turn values for {len(spans)} turn spans")
        for v, (start, end) in zip(vals, spans):
            out[i, start:end] = v
    return out


def broadcast_episodes(advantages: torch.Tensor, assistant_mask: torch.Tensor) -> torch.Tensor:
    """An episode-level advantage on every assistant token: ``(B,) x (B, T) -> (B, T)``."""
    return advantages.view(-1, 1) * assistant_mask.float()


class ValueHead(nn.Module):
    """A scalar value read from the policy's hidden state at each assistant turn's boundary.

    The boundary of turn ``t`` is the last token before the turn (the end of the generation prompt):
    the state the policy acts from. The head has its own parameters, trained with :meth:`loss`, so the
    value function never moves the policy's LoRA weights.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor, boundaries: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """``hidden`` (B, T, H); ``boundaries[i]`` token indices -> one ``(K_i,)`` tensor of values per episode."""
        return [self.proj(hidden[i, list(b)].float()).squeeze(-1) for i, b in enumerate(boundaries)]

    @staticmethod
    def boundaries(turn_spans: Sequence[Sequence[tuple[int, int]]]) -> list[list[int]]:
        return [[start - 1 for start, _ in spans] for spans in turn_spans]

    @staticmethod
    def loss(values: list[torch.Tensor], targets: Sequence[Sequence[float]]) -> torch.Tensor:
        """Mean squared error ``0.5 * (V - target)^2`` over all turns of all episodes."""
        v = torch.cat(values)
        t = torch.tensor([x for row in targets for x in row], dtype=v.dtype, device=v.device)
        return 0.5 * ((v - t) ** 2).mean()
