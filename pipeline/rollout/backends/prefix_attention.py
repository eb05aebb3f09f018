"""Attention over a shared prompt prefix, stored once for a whole batch.

The episodes of a batch share their system prompt, usually most of the context (about 1,700 of 2,000
tokens in the customer-service domain). Its keys and values are kept once, shape (1, H_kv, P, D), not
once per row; each row's cache holds only what follows the prefix. Attention then runs in two parts, one
matmul of every row's queries against the shared prefix and a batched matmul against each row's own
keys, joined by one softmax. A decode step reads the prefix once instead of once per episode, which on
CPU is most of its cost.

:func:`shared_prefix_attention` is a transformers attention function; :func:`prefix_attention` runs a
model with it, over given prefix layers, for the duration of a ``with`` block. It is registered with
transformers' ``AttentionInterface`` on first use (:func:`register_attention`), never at import.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
from transformers import AttentionInterface

_ACTIVE_PREFIX: contextvars.ContextVar[list | None] = contextvars.ContextVar("turnwise_prefix", default=None)
ATTENTION_NAME = "turnwise_shared_prefix"


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of ``query`` (B, Hq, q, D) over the active shared prefix (1, Hkv, P, D) of layer
    ``module.layer_idx``, visible to every query, then each row's own ``key``/``value`` (B, Hkv, S, D)
    under ``attention_mask`` (B, 1, q, S) bool, True = attend. Returns (B, q, Hq, D) like transformers'
    attention functions. Rows that see no key at all get zeros (never NaN, which would poison the cache)."""
    prefix = _ACTIVE_PREFIX.get()
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5
    # (B, Hkv, g*q, D): the query heads of one key/value head side by side (no repeat of keys/values)
    q = query.reshape(batch, kv_heads, group * q_len, dim)
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale  # (B, Hkv, g*q, S)
    if attention_mask is not None:
        mask = attention_mask[:, :, None].expand(batch, 1, group, q_len, attention_mask.shape[-1])
        scores = scores.masked_fill(~mask.reshape(batch, 1, group * q_len, -1), float("-inf"))
    top = scores.amax(-1, keepdim=True)
    layers = prefix[module.layer_idx] if prefix is not None else None
    if layers is not None:
        pk, pv = layers
        qp = q.transpose(0, 1).reshape(kv_heads, batch * group * q_len, dim)  # every row against one prefix
        prefix_scores = torch.matmul(qp, pk[0].transpose(-1, -2)).float() * scale  # (Hkv, B*g*q, P)
        prefix_scores = prefix_scores.view(kv_heads, batch, group * q_len, -1).transpose(0, 1)
        top = torch.maximum(top, prefix_scores.amax(-1, keepdim=True))
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = (scores - top).exp()
    total = weights.sum(-1, keepdim=True)
    out = torch.matmul(weights.to(value.dtype), value).float()  # (B, Hkv, g*q, D)
    if layers is not None:
        prefix_weights = (prefix_scores - top).exp()
        total = total + prefix_weights.sum(-1, keepdim=True)
        pw = prefix_weights.transpose(0, 1).reshape(kv_heads, batch * group * q_len, -1).to(pv.dtype)
        out = out + torch.matmul(pw, pv[0]).float().view(kv_heads, batch, group * q_len, -1).transpose(0, 1)
    out = (out / total.clamp_min(1e-30)).to(query.dtype)
    return out.reshape(batch, heads, q_len, -1).transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Make :func:`shared_prefix_attention` known to transformers as ``ATTENTION_NAME``; returns the name.

    Called on first use, not at import: importing turnwise changes nothing in transformers. Calling it
    again changes nothing either.
    """
    if AttentionInterface().get(ATTENTION_NAME) is not shared_prefix_attention:
        AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention)
    return ATTENTION_NAME


@contextlib.contextmanager
def prefix_attention(model, prefix_layers: list | None):
    """Run ``model`` with :func:`shared_prefix_attention` (over ``prefix_layers``, or none) for the duration."""
    register_attention()
    config = model.config
    previous = config._attn_implementation
    token = _ACTIVE_PREFIX.set(prefix_layers)
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
        _ACTIVE_PREFIX.reset(token)


def visible_keys(valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """(B, 1, q, S) bool: key column ``s`` is visible to query ``i`` when it holds a real token (``valid``,
    (B, S)) and is not after the query (queries are the last ``q_len`` columns)."""
    width = valid.shape[1]
    if q_len == 1:
        return valid[:, None, None, :]
    cols = torch.arange(width, device=valid.device)
    causal = cols[None, :] <= (width - q_len + torch.arange(q_len, device=valid.device))[:, None]
    return valid[:, None, None, :] & causal[None, None]
