"""The critic of the ``gae`` estimator: a value head on the policy's own hidden states.

A multi-turn episode's state before assistant turn ``t`` is everything the policy has read so far, so
the value is read from the policy's last hidden state at the token just before the turn (the end of
the generation prompt). The head is a single linear layer with its own parameters and optimiser: the
value loss never moves the policy's LoRA weights, and the hidden states come from a no-grad pass.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from pipeline.trajectory import Trajectory


class ValueHead(nn.Module):
    """A scalar value read from the policy's hidden state at each assistant turn's boundary.

    The boundary of turn ``t`` is the last token before the turn (the end of the generation prompt):
    the state the policy acts from. The head has its own parameters, trained with :meth:`loss`, so the
    value function never moves the policy's LoRA weights. It starts at zero, so the first batch's
    advantages are the plain (discounted) returns.
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
        """The token index before each turn: ``[[start - 1 for each turn's (start, end)] per episode]``."""
        return [[start - 1 for start, _ in spans] for spans in turn_spans]

    @staticmethod
    def loss(values: list[torch.Tensor], targets: Sequence[Sequence[float]]) -> torch.Tensor:
        """Mean squared error ``0.5 * (V - target)^2`` over all turns of all episodes."""
        v = torch.cat(values)
        t = torch.tensor([x for row in targets for x in row], dtype=v.dtype, device=v.device)
        return 0.5 * ((v - t) ** 2).mean()


@torch.no_grad()
def boundary_hidden_states(model, trajectories: Sequence[Trajectory], pad_id: int) -> tuple[torch.Tensor, list]:
    """The policy's last hidden state at each assistant turn's boundary (the token before the turn), as
    (B, K, H) float32 with K the most turns in the batch, and per episode the indices ``range(K_i)`` into it.

    One no-grad pass of the decoder (LoRA layers included, LM head left out) over each episode up to
    its last boundary, in eval mode (no dropout); the model's train/eval mode is restored afterwards.
    """
    boundaries = ValueHead.boundaries([t.tokens.turn_spans for t in trajectories])
    length = max(b[-1] for b in boundaries) + 1
    ids = torch.full((len(trajectories), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(trajectories):
        seq = t.tokens.input_ids[: boundaries[i][-1] + 1]
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, base.base_model_prefix, base)  # the decoder without the LM head (LoRA layers included)
    was_training = model.training
    model.eval()
    hidden = body(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).last_hidden_state
    model.train(was_training)
    out = hidden.new_zeros(len(trajectories), max(map(len, boundaries)), hidden.shape[-1], dtype=torch.float32)
    for i, b in enumerate(boundaries):
        out[i, : len(b)] = hidden[i, b].float()
    return out, [list(range(len(b))) for b in boundaries]
