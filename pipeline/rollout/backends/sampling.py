"""Choosing the next token from a batch of logits: greedy, or temperature and top-p sampling.

Tokens are drawn on CPU with the backend's own ``torch.Generator``, so a seed gives the same tokens on
any device and whatever else uses torch's global RNG.
"""

from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B,) and their log-probabilities (B,), on CPU, for ``logits`` (B, V).

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
    tokens = torch.multinomial(probs.cpu(), 1, generator=generator).view(-1)
    return tokens, logprobs.cpu().gather(-1, tokens.view(-1, 1)).view(-1)
