"""What each episode has cached between turns, and the prompt prefix new episodes share.

An episode's next prompt extends its last one: the previous prompt, the tokens sampled, then the
environment's reply. :class:`EpisodeCaches` keeps, per episode key, the keys and values of everything up
to the last sampled token, so the next turn prefills only what is new. New episodes of one domain start
with the same system prompt; its keys and values are kept once, as a :class:`SharedPrefix` that every
row attends to (:mod:`~pipeline.rollout.backends.prefix_attention`), and each episode's own cache holds
only what follows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import torch

from pipeline.rollout.backends.base import GenerationRequest
from pipeline.rollout.backends.kv_cache import row_layers

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v), each of shape (1, H, n, D)


@dataclass
class SharedPrefix:
    """A prompt prefix shared by new episodes: its ids and per-layer ``(k, v)`` of shape (1, H, P, D)."""

    ids: list[int]
    layers: Layers

    def starts(self, prompt: Sequence[int]) -> bool:
        return prompt[: len(self.ids)] == self.ids


@dataclass
class CachedEpisode:
    """An episode's cache: ``ids`` it covers; ``layers`` hold the keys/values of ``ids`` after ``prefix``."""

    ids: list[int]
    prefix: SharedPrefix | None
    layers: Layers | None


@dataclass
class Past:
    """What a request can reuse: the shared ``prefix`` (or None), the row's own ``layers`` after it (or
    None), and how many prompt tokens the two cover together (``covered``)."""

    prefix: SharedPrefix | None
    layers: Layers | None
    covered: int


class EpisodeCaches:
    """Episode caches by key, and the current shared prefix. With ``enabled=False`` nothing is kept:
    every lookup misses, so every row prefills its whole prompt."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.episodes: dict[Hashable, CachedEpisode] = {}
        self.prefix: SharedPrefix | None = None

    def release(self, key: Hashable) -> None:
        self.episodes.pop(key, None)

    def prompts_needing_a_prefix(self, requests: Sequence[GenerationRequest]) -> list[list[int]]:
        """The prompts of new episodes (nothing cached under their key), or none when caching is off or
        the current shared prefix already starts every one of them."""
        if not self.enabled:
            return []
        fresh = [r.prompt_ids for r in requests if r.key not in self.episodes]
        if self.prefix is not None and all(self.prefix.starts(p) for p in fresh):
            return []
        return fresh

    def lookup(self, request: GenerationRequest) -> Past:
        """The reusable cache for a request: its episode's own cache where the prompt still extends what it
        covers, else the shared prefix where it starts the prompt, else nothing. At least one prompt
        token is always left to feed, since its logits pick the first sampled token."""
        prompt = request.prompt_ids
        entry = self.episodes.get(request.key) if self.enabled else None
        if entry is not None:
            n = min(len(entry.ids), len(prompt) - 1)
            start = len(entry.prefix.ids) if entry.prefix is not None else 0
            if n >= start and prompt[:n] == entry.ids[:n]:
                layers = entry.layers
                if layers is not None and n < len(entry.ids):
                    layers = [(k[:, :, : n - start], v[:, :, : n - start]) for k, v in layers]
                return Past(entry.prefix, layers, n)
        prefix = self.prefix if self.enabled else None
        if prefix is not None and len(prefix.ids) < len(prompt) and prefix.starts(prompt):
            return Past(prefix, None, len(prefix.ids))
        return Past(None, None, 0)

    def keep(self, request: GenerationRequest, sampled: list[int], prefix: SharedPrefix | None, cache, row: int,
             valid: torch.Tensor) -> None:
        """Keep row ``row`` of a decoding ``cache`` (its real columns, ``valid`` (S,) bool) as the request's
        episode cache. With ``prefix`` it covers the prompt and all sampled tokens but the last, whose
        key/value is computed when it is fed next turn."""
        if not self.enabled:
            return
        self.episodes[request.key] = CachedEpisode(list(request.prompt_ids) + sampled[:-1], prefix,
                                                   row_layers(cache, row, valid))
