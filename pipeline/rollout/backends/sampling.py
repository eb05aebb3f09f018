"""Choosing the next token from a batch of logits: greedy, or temperature and top-p sampling.

Tokens are drawn on CPU from ``torch.Generator`` objects the backend owns, one per row (each episode's own
stream), so a seed gives the same tokens on any device, whatever else uses torch's global RNG, and
whichever other rows share the batch.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch


def stream_seed(seed: int, stream: int) -> int:
    """The seed of random stream ``stream`` under a backend seeded with ``seed``: a 63-bit hash of both, so
    neighbouring streams are unrelated.

    >>> stream_seed(0, 1) == stream_seed(0, 1) != stream_seed(1, 0)
    True
    """
    digest = hashlib.sha256(f"turnwise-sampling:{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generator: torch.Generator | Sequence[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B,) and their log-probabilities (B,), on CPU, for ``logits`` (B, V).

    ``generator`` is one generator for the whole batch, or one per row (row ``b`` draws from
    ``generator[b]`` only, so its token does not depend on the other rows).
    ``temperature <= 0`` takes the argmax, with its log-probability under ``log_softmax(logits)``.
    Otherwise a token is drawn from ``softmax(logits / temperature)`` restricted to its top-p nucleus (the
    smallest set of most likely tokens whose probability reaches ``top_p``), and its log-probability is
    the one under ``log_softmax(logits / temperature)``, before the nucleus cut.
    """
    if temperature <= 0:
        logprobs = torch.log_softmax(logits, dim=-1)
        tokens = logits.argmax(dim=-1)
        return tokens.cpu(), logprobs.gather(-1, tokens.view(-1, 1)).view(-1).cpu()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    probs = logprobs.exp()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    probs = probs.cpu()
    if isinstance(generator, torch.Generator):
        tokens = torch.multinomial(probs, 1, generator=generator).view(-1)
    else:
        if len(generator) != probs.shape[0]:
            raise ValueError(f"got {len(generator)} generators for {probs.shape[0]} rows; pass one per row.")
        tokens = torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generator)])
    return tokens, logprobs.cpu().gather(-1, tokens.view(-1, 1)).view(-1)
