"""The generation backend protocol: token prompts in, sampled token ids and their logprobs out.

A backend works on token ids, never on text, so what the trainer later scores are exactly the ids that
were sampled. ``key`` names the episode a request belongs to, so a backend can keep that episode's state
(its KV cache) between turns; :meth:`GenerationBackend.release` says the episode has ended.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Protocol, Sequence, runtime_checkable


@dataclass
class GenerationRequest:
    """Continue ``prompt_ids`` for at most ``max_new_tokens``; ``key`` names the episode for cache reuse.

    ``seed`` names the episode's random stream: a sampling backend draws the episode's tokens from a
    generator seeded by its own seed and this one, so what an episode samples does not depend on which
    other episodes share its batch. ``None``: the backend numbers new episodes in the order it meets them.
    """

    key: Hashable
    prompt_ids: list[int]
    max_new_tokens: int
    seed: int | None = None


@dataclass
class Generation:
    """``token_ids`` are the sampled ids (ending with the stop token when one was sampled);
    ``logprobs[i]`` is the log-probability of ``token_ids[i]`` under the sampling distribution."""

    token_ids: list[int]
    logprobs: list[float]
    truncated: bool
    stats: dict = field(default_factory=dict)


@runtime_checkable
class GenerationBackend(Protocol):
    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]: ...

    def release(self, key: Hashable) -> None:
        """Forget an episode's cached state."""
        ...
