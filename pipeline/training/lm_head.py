"""Per-token log-probabilities from the LM head at the scored positions only, in chunks.

A policy-gradient or SFT loss needs ``log p(token_t | context)`` at the positions it trains: the
assistant tokens. A plain forward projects every position onto the vocabulary first; for a
customer-service episode that is ~2,300 positions x 49,152 columns in float32 (450 MB a row), almost all
of it the system prompt and the environment's replies, which the loss then masks out. TRL 1.16's fused LM
head avoids materialising those logits, but off Triton devices (any CPU) it still projects every
position.

:func:`selective_log_probs` projects only the rows of hidden states it is given, ``chunk`` tokens at a
time: each chunk's logits (``chunk x V``, about :data:`TILE_BYTES`) are reduced to the target's
log-probability with a log-sum-exp (the selective log-softmax) and dropped. The backward recomputes each
chunk's logits from the saved hidden states and turns them into the logits' gradient, ``g * (onehot - p)``,
without ever holding more than one chunk (the technique of Liger's and TRL's fused linear
cross-entropy). It runs on any device with plain torch ops.

:func:`scored_log_probs` is the model-level entry point: hidden states (B, L, H), next-token labels (B, L)
with ``-100`` where nothing is scored, the model's LM head; it returns (B, L) log-probabilities (and
entropies) that are 0 where nothing was scored, as TRL's fused head returns them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

#: Bytes of float32 logits one chunk may hold; sets the tokens per chunk from the vocabulary size.
TILE_BYTES = 32 * 2**20
IGNORE_INDEX = -100


@dataclass(frozen=True)
class HeadTransform:
    """How a model turns the LM head's output ``y`` into logits: ``z = softcap * tanh(scale * y / softcap)``
    (``z = scale * y`` without soft-capping), then divided by the sampling temperature."""

    logit_scale: float = 1.0
    softcap: float | None = None


def head_transform(config: Any) -> HeadTransform:
    """The logit scaling and soft-capping a causal LM's ``config`` declares, read as TRL's fused head reads
    them (``final_logit_softcapping``; ``logit_scale``, ``output_multiplier``, ``lm_head_multiplier`` or
    ``logits_scaling``)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if getattr(text, "model_type", "") == "hyperclovax" else 1 / text.logits_scaling
    return HeadTransform(1.0 if scale is None else float(scale), getattr(text, "final_logit_softcapping", None))


def chunk_tokens(vocab: int, tile_bytes: int = TILE_BYTES) -> int:
    """Tokens per chunk so that one chunk's float32 logits take about ``tile_bytes``.

    >>> chunk_tokens(49152)
    170
    """
    return max(1, tile_bytes // (4 * vocab))


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transform: HeadTransform,
            inv_t: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 logits (n, V) of ``hidden`` (n, H) and, with soft-capping, ``tanh`` of the capped value (for the
    backward)."""
    z = torch.mm(hidden, weight.t()).float()
    if bias is not None:
        z += bias.float()
    if transform.logit_scale != 1.0:
        z *= transform.logit_scale
    t = None
    if transform.softcap is not None:
        t = torch.tanh(z / transform.softcap)
        z = t * transform.softcap
    if inv_t != 1.0:
        z *= inv_t
    return z, t


class _SelectiveLogProbs(torch.autograd.Function):
    """Target log-probabilities (N,), entropies (N,) and top-1 flags (N,) of ``hidden @ weight.T`` in chunks of
    tokens; see :func:`selective_log_probs`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_t, transform, chunk, with_entropy, with_top1):
        ctx.set_materialize_grads(False)
        dtype = _compute_dtype(hidden)
        n_tokens = hidden.shape[0]
        log_z = hidden.new_empty(n_tokens, dtype=torch.float32)
        logprobs = torch.empty_like(log_z)
        entropy = torch.empty_like(log_z) if with_entropy else None
        top1 = torch.empty(n_tokens, dtype=torch.bool, device=hidden.device) if with_top1 else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for lo in range(0, n_tokens, chunk):
                hi = min(lo + chunk, n_tokens)
                z, _ = _logits(hidden[lo:hi].to(dtype), w, bias, transform, inv_t)
                log_z[lo:hi] = torch.logsumexp(z, dim=-1)
                logprobs[lo:hi] = z.gather(1, targets[lo:hi, None]).squeeze(1) - log_z[lo:hi]
                if with_top1:
                    top1[lo:hi] = z.argmax(-1) == targets[lo:hi]  # argmax: a tie with an earlier token is not top-1
                if with_entropy:
                    # H = log Z - sum_j p_j z_j
                    z_mean = torch.softmax(z, dim=-1).mul_(z).sum(-1)
                    entropy[lo:hi] = log_z[lo:hi] - z_mean
        ctx.save_for_backward(hidden, weight, bias, targets, log_z, entropy if with_entropy else log_z)
        ctx.inv_t, ctx.transform, ctx.chunk, ctx.dtype = inv_t, transform, chunk, dtype
        if top1 is not None:
            ctx.mark_non_differentiable(top1)
        return logprobs, entropy, top1

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, _grad_top1):
        hidden, weight, bias, targets, log_z, entropy = ctx.saved_tensors
        inv_t, transform, chunk, dtype = ctx.inv_t, ctx.transform, ctx.chunk, ctx.dtype
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for lo in range(0, hidden.shape[0], chunk):
                hi = min(lo + chunk, hidden.shape[0])
                h = hidden[lo:hi].to(dtype)
                z, t = _logits(h, w, bias, transform, inv_t)
                log_p = z.sub_(log_z[lo:hi, None])  # z is not needed past this point
                p = log_p.exp()
                grad = torch.zeros_like(p)
                if grad_logprobs is not None:
                    # d log p_target / d z_j = 1[j = target] - p_j
                    g = grad_logprobs[lo:hi].float()
                    grad.addcmul_(p, g[:, None], value=-1.0)
                    grad.scatter_add_(1, targets[lo:hi, None], g[:, None])
                if grad_entropy is not None:
                    # d H / d z_j = -p_j (log p_j + H)
                    g = grad_entropy[lo:hi].float()
                    grad.sub_(p.mul_(log_p.add_(entropy[lo:hi, None])).mul_(g[:, None]))
                del p, log_p
                # back through z = softcap * tanh(scale * y / softcap) * inv_t
                factor = inv_t * transform.logit_scale
                if t is not None:
                    grad.mul_(1 - t * t)
                if factor != 1.0:
                    grad.mul_(factor)
                if need_hidden:
                    grad_hidden[lo:hi] = torch.mm(grad.to(dtype), w).float()
                if need_weight:
                    grad_weight.addmm_(grad.t(), h.float())
                if need_bias:
                    grad_bias += grad.sum(0)
        return (grad_hidden.to(hidden.dtype) if need_hidden else None,
                grad_weight.to(weight.dtype) if need_weight else None,
                grad_bias.to(bias.dtype) if need_bias else None,
                None, None, None, None, None, None)


def selective_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        bias: torch.Tensor | None = None, temperature: float = 1.0,
                        transform: HeadTransform = HeadTransform(), with_entropy: bool = False,
                        with_top1: bool = False, chunk: int | None = None):
    """``log softmax(z)[target]`` for each of ``N`` tokens, with ``z = transform(hidden @ weight.T + bias) /
    temperature``, never holding more than ``chunk`` tokens' logits.

    ``hidden`` (N, H), ``weight`` (V, H), ``bias`` (V,) or None, ``targets`` (N,) int64 in ``[0, V)``.
    Returns ``(log_probs, entropy, top1)``: float32 (N,) log-probabilities; the float32 (N,) entropy of each
    token's distribution with ``with_entropy`` (else None); with ``with_top1``, a bool (N,) saying whether the
    target is the first argmax (else None). Both the log-probabilities and the entropy are differentiable
    with respect to ``hidden``, ``weight`` and ``bias``. Under autocast the projections run in the autocast
    dtype and the softmax in float32; ``chunk`` defaults to :func:`chunk_tokens` of the vocabulary.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"selective_log_probs needs hidden (N, H) and weight (V, H); got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}.")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be (N,) = ({hidden.shape[0]},), got {tuple(targets.shape)}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    chunk = chunk or chunk_tokens(weight.shape[0])
    return _SelectiveLogProbs.apply(hidden, weight, bias, targets.long(), 1.0 / temperature, transform, chunk,
                                    with_entropy, with_top1)


def has_plain_head(model) -> bool:
    """Whether ``model``'s LM head is a plain ``nn.Linear`` that :func:`scored_log_probs` can use."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base.get_output_embeddings()) is torch.nn.Linear


def output_head(model) -> torch.nn.Linear:
    """The LM head of a causal LM (PEFT-wrapped or not) as a plain ``nn.Linear``.

    Raises ValueError when the head is not one (for example an adapter trains it, whose update the fused
    computation would skip); callers then use the model's own forward.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if not has_plain_head(model):
        raise ValueError(f"the LM head is a {type(head).__name__}, not a plain Linear layer; scored_log_probs needs "
                         "the plain head (do not put an adapter on lm_head).")
    return head


def scored_log_probs(model, hidden_states: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                     with_entropy: bool = False, with_top1: bool = False):
    """Log-probabilities of the next-token ``labels`` from ``hidden_states``, computed at scored positions only.

    ``hidden_states`` (B, L, H) are the decoder's last hidden states; ``labels`` (B, L) hold, at each position,
    the token the position predicts, or ``-100`` where nothing is scored (already shifted: position ``t``
    scores ``labels[:, t]``). Returns ``(log_probs, entropy, top1)``, each (B, L) and 0 (False) where nothing
    is scored, entropy and top1 None unless asked for; the LM head (and the model's logit scaling and
    soft-capping) are ``model``'s, divided by ``temperature``.
    """
    head = output_head(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    labels = labels.to(hidden_states.device)
    mask = labels != IGNORE_INDEX
    logprobs, entropy, top1 = selective_log_probs(
        hidden_states[mask], head.weight, labels[mask], bias=head.bias, temperature=temperature,
        transform=head_transform(base.config), with_entropy=with_entropy, with_top1=with_top1)
    # masked_scatter keeps the result connected to the model even when nothing is scored
    spread = lambda x: None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x)  # noqa: E731
    return spread(logprobs), spread(entropy), spread(top1)
